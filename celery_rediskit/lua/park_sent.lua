-- Entries taken for re-sending have been published: they wait for their message now.
-- KEYS[1] sent, KEYS[2] ahead (see _park.lua)
-- ARGV[1] how long a published entry waits for its message before a sweep re-sends it (or,
--         sent ahead, drops its mark), ms
-- ARGV[2], ARGV[3], ... pairs of id, dispatch id
-- An entry adopted meanwhile, taken again under another dispatch id, or (sent ahead) whose
-- message arrived already, is left alone. Returns how many were marked.
-- needs: _clock
local now = now_ms()
local marked = 0
for i = 2, #ARGV, 2 do
  local deadline = string.format('%.0f', now + tonumber(ARGV[1]))
  local entry = redis.call('HGET', KEYS[1], ARGV[i])
  if entry then
    local did, turn = string.match(entry, '^([^|]*)|t|%d+|(%d+)$')
    if did == ARGV[i + 1] then
      redis.call('HSET', KEYS[1], ARGV[i], did .. '|p|' .. deadline .. '|' .. turn)
      marked = marked + 1
    end
  else
    local ahead = redis.call('HGET', KEYS[2], ARGV[i])
    if ahead then
      local did, turn = string.match(ahead, '^([^|]*)|A|%d+|(%d+)|$')
      if did == ARGV[i + 1] then
        redis.call('HSET', KEYS[2], ARGV[i], did .. '|a|' .. deadline .. '|' .. turn .. '|')
        marked = marked + 1
      end
    end
  end
end
return marked
