-- Change a cache entry's lifetime, and its tag sets' scores and lifetimes with it.
-- needs: _cache_entry
-- KEYS[1] entry
-- ARGV[1] new lifetime, ms; "0" for none
-- ARGV[2] tag key prefix
-- ARGV[3] (optional) "tags": return the entry's tags too (Redis Cluster: the provider then
--         extends the tags' directories, see cache/redis.py)
-- Returns: 1 if the entry exists, else 0; with "tags", {1, tag, ...} if it exists, else 0
local value = redis.call('GET', KEYS[1])
if not value then return 0 end
local ttl = tonumber(ARGV[1])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
else
  redis.call('PERSIST', KEYS[1])
end
cache_index(KEYS[1], value, ttl, ARGV[2])
if ARGV[3] == 'tags' then
  local out = {1}
  for _, t in ipairs(cache_tags(value)) do out[#out + 1] = t end
  return out
end
return 1
