-- Remove entries (revoked tasks): parked ones (also those sent ahead: their waiter finds
-- its entry gone and stops), and sent ones not yet adopted (their reservation is given
-- back, so the caller dispatches again).
-- needs: _park
-- KEYS[1..7] see _park.lua
-- ARGV[1] kind "m" / "s"; ARGV[2], ... ids
-- Returns the ids removed.
local kind = ARGV[1]
local removed = {}
for i = 2, #ARGV do
  local id = ARGV[i]
  local gone = redis.call('ZREM', KEYS[3], id) == 1
  redis.call('HDEL', KEYS[7], id)
  local entry = redis.call('HGET', KEYS[5], id)
  if entry then
    gone = true
    redis.call('HDEL', KEYS[5], id)
    local owner = 'park:' .. string.match(entry, '^([^|]*)|')
    if kind == 'm' then
      if redis.call('GET', KEYS[1]) == owner then redis.call('DEL', KEYS[1]) end
    else
      redis.call('ZREM', KEYS[1], owner)
    end
  end
  if gone then
    redis.call('HDEL', KEYS[4], id)
    removed[#removed + 1] = id
  end
end
return removed
