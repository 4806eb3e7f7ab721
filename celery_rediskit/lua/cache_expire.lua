-- Change a cache entry's lifetime, and its tag sets' scores and lifetimes with it.
-- needs: _cache_entry
-- KEYS[1] entry
-- ARGV[1] new lifetime, ms; "0" for none
-- ARGV[2] tag key prefix
-- Returns: 1 if the entry exists, else 0
local value = redis.call('GET', KEYS[1])
if not value then return 0 end
local ttl = tonumber(ARGV[1])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
else
  redis.call('PERSIST', KEYS[1])
end
cache_index(KEYS[1], value, ttl, ARGV[2])
return 1
