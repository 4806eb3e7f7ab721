-- A re-sent entry arrives: it takes over the lock or permit reserved for it.
-- needs: _park
-- KEYS[1..6] see _park.lua
-- ARGV[1] kind "m" / "s"
-- ARGV[2] id
-- ARGV[3] dispatch id the message carries
-- ARGV[4] lease, ms: the reservation's lease from now
-- Returns the fencing token (a lock) or 1 (a permit) when adopted: owner "park:<dispatch id>"
-- now holds it for the lease; 0 when the entry was this message's but its reservation ended
-- (it waited too long: the caller asks again, keeping its turn); -1 when the entry is gone or
-- was sent under another dispatch id (this message is a copy that must not run).
local kind, id, did = ARGV[1], ARGV[2], ARGV[3]
local entry = redis.call('HGET', KEYS[5], id)
if not entry or string.match(entry, '^([^|]*)|') ~= did then return -1 end
redis.call('HDEL', KEYS[5], id)
redis.call('HDEL', KEYS[4], id)
local owner, lease = 'park:' .. did, tonumber(ARGV[4])
if kind == 'm' then
  if redis.call('GET', KEYS[1]) ~= owner then return 0 end
  redis.call('PEXPIRE', KEYS[1], lease)
  return tonumber(redis.call('GET', KEYS[2])) or 1
end
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], owner) then return 0 end
redis.call('ZADD', KEYS[1], 'XX', now + lease, owner)
keep_until(KEYS[1], now + lease)
return 1
