-- Drop a resource from the index of resources with parked entries, unless it was indexed
-- again since it was read (a park since then re-adds it with a new score).
-- KEYS[1] the index (ZSET "<kind>|<name>" -> score)
-- ARGV[1] member, ARGV[2] the score (an integer) it had when read
-- Returns 1 when dropped.
if tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1])) == tonumber(ARGV[2]) then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
