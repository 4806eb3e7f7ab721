-- Store a cache entry and index its tags.
-- needs: _cache_entry
-- KEYS[1] entry      string "<content type>\n<tags>\n<payload>", lifetime as PX expiry
-- ARGV[1] the entry (as stored)
-- ARGV[2] lifetime, ms; "0" for none
-- ARGV[3] tag key prefix ("<prefix>:cache:t:")
-- Returns: 1
cache_store(KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3])
return 1
