-- Redis Cluster: note in a tag's directory that a slot group holds entries with the tag.
-- needs: _clock
-- KEYS[1] the tag's directory "<prefix>:cache:tg:{<tag>}": zset of slot tags, each scored by
--         the latest expiry of an entry noted for it (ms, server clock of this node)
-- ARGV[1] the slot tag of the entry's slot (see _redis/slots.py)
-- ARGV[2] lifetime to cover, ms: the entry's, plus a margin for clock differences between nodes
-- Returns: 1
-- The provider runs this before it stores the entry, so the directory always names the group
-- of a stored entry; a group whose entries are gone stays listed until its score passes
-- (revalidation then finds its set empty). A later score never shrinks (ZADD GT).
local now = now_ms()
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local pttl = redis.call('PTTL', KEYS[1])
redis.call('ZADD', KEYS[1], 'GT', now + ttl, ARGV[1])
if pttl == -2 or (pttl >= 0 and pttl < ttl) then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 1
