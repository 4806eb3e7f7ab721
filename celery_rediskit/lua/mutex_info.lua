-- Read a mutex's state in one consistent step.
-- KEYS[1] lock, KEYS[2] fence
-- Returns {holder or false, remaining lease ms (-2 when free), last fencing token or false}
local holder = redis.call('GET', KEYS[1])
return {holder, redis.call('PTTL', KEYS[1]), redis.call('GET', KEYS[2])}
