-- Drop every entry carrying a tag, and the tag's set.
-- needs: _cache_entry
-- KEYS[1] the tag set (zset of entry keys, see _cache_entry.lua)
-- ARGV[1] tag key prefix
-- Returns: the number of entries deleted
local count = 0
for _, entry in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local value = redis.call('GET', entry)
  if value then
    cache_untag(entry, value, ARGV[1], KEYS[1])
    redis.call('DEL', entry)
    count = count + 1
  end
end
redis.call('DEL', KEYS[1])
return count
