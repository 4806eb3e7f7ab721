-- Write a fenced resource: a value only the holder of the newest fencing token may change.
-- KEYS[1] resource  hash: "value" (the last accepted write), "token" (the highest token seen)
-- ARGV[1] token     the writer's fencing token (an integer >= 1)
-- ARGV[2] value     what to write
-- Returns: {1, token} when written: ARGV[1] >= the highest token seen, and becomes it;
--          {0, highest} when refused: ARGV[1] < the highest token seen (nothing changes).
local token = tonumber(ARGV[1])
local highest = tonumber(redis.call('HGET', KEYS[1], 'token') or '0')
if token < highest then
  return {0, highest}
end
redis.call('HSET', KEYS[1], 'token', token, 'value', ARGV[2])
return {1, token}
