-- Entries taken for re-sending have been published: they wait for their message now.
-- KEYS[1] sent (see _park.lua)
-- ARGV[1] how long a published entry waits for its message before a sweep re-sends it, ms
-- ARGV[2], ARGV[3], ... pairs of id, dispatch id
-- An entry adopted meanwhile, or taken again under another dispatch id, is left alone.
-- Returns how many were marked.
-- needs: _clock
local now = now_ms()
local marked = 0
for i = 2, #ARGV, 2 do
  local entry = redis.call('HGET', KEYS[1], ARGV[i])
  if entry then
    local did, turn = string.match(entry, '^([^|]*)|t|%d+|(%d+)$')
    if did == ARGV[i + 1] then
      redis.call('HSET', KEYS[1], ARGV[i], did .. '|p|'
                 .. string.format('%.0f', now + tonumber(ARGV[1])) .. '|' .. turn)
      marked = marked + 1
    end
  end
end
return marked
