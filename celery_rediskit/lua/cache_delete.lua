-- Delete a cache entry and drop it from its tag sets.
-- needs: _cache_entry
-- KEYS[1] entry
-- ARGV[1] tag key prefix
-- Returns: 1 if the entry existed, else 0
local value = redis.call('GET', KEYS[1])
if not value then return 0 end
cache_untag(KEYS[1], value, ARGV[1], nil)
redis.call('DEL', KEYS[1])
return 1
