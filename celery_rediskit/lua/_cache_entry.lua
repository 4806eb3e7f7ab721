-- Shared library: cache entries and their tag index.
-- Prepended by scripts.py to every script whose header says "-- needs: _cache_entry".
-- needs: _clock
--
-- An entry is a STRING "<content type>\n<tags>\n<payload>" (tags joined by "\31", maybe none),
-- with the entry's lifetime as its PX expiry. So an entry remembers its own tags.
-- A tag set is a ZSET "<tag prefix>{<tag>}" of entry keys, scored by the entry's expiry
-- (ms, server clock; "+inf" for none). Members whose score has passed are trimmed whenever the
-- set is written, and the set's own expiry is the latest of its members', so the index never
-- grows past the live entries. Deleting or overwriting an entry removes it from its old sets.
--
-- Tag sets are named here from a tag prefix. On one server it is "<prefix>:cache:t:" and tag T
-- is the set "<prefix>:cache:t:{T}". On a Redis Cluster a script may only touch one slot, so
-- the provider passes the prefix of the entry's slot group, "<prefix>:cache:t:{<slot tag>}:"
-- (it carries a hash tag: see _redis/slots.py), and tag T's entries of that slot are the set
-- "<prefix>:cache:t:{<slot tag>}:T", in the entry's own slot. A directory per tag lists the
-- slot groups holding its entries (cache_tag_group.lua; see cache/redis.py).

-- The tags recorded in a stored entry (nil or false: none).
local function cache_tags(value)
  local tags = {}
  if not value then return tags end
  local a = string.find(value, '\n', 1, true)
  if not a then return tags end
  local b = string.find(value, '\n', a + 1, true)
  if not b or b == a + 1 then return tags end
  for t in string.gmatch(string.sub(value, a + 1, b - 1), '[^\31]+') do
    tags[#tags + 1] = t
  end
  return tags
end

-- The tag set of `tag` under tag prefix `prefix`: a prefix carrying a hash tag is a slot
-- group's (cluster), and the tag follows it; otherwise the tag is the set's own hash tag.
local function cache_tag_key(prefix, tag)
  if string.find(prefix, '{', 1, true) then return prefix .. tag end
  return prefix .. '{' .. tag .. '}'
end

-- Add `member` to zset `key` scored by its expiry `at` (ms, server clock; "+inf": none), after
-- dropping members whose expiry has passed; the set lives as long as its longest-lived member.
-- `ttl` is at - now (0 or less: none).
local function cache_zadd_live(key, member, at, ttl, now)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  local pttl = redis.call('PTTL', key) -- after the trim, which may have deleted the set
  redis.call('ZADD', key, at, member)
  if ttl <= 0 then
    redis.call('PERSIST', key)
  elseif pttl == -2 or (pttl >= 0 and pttl < ttl) then
    redis.call('PEXPIRE', key, ttl)
  end
end

-- Remove `entry` from the tag sets named in its stored `value`, except the set `keep`.
local function cache_untag(entry, value, prefix, keep)
  for _, t in ipairs(cache_tags(value)) do
    local tk = cache_tag_key(prefix, t)
    if tk ~= keep then redis.call('ZREM', tk, entry) end
  end
end

-- Give entry's tag sets the entry's expiry `ttl` (ms; 0 or less: none) as score and lifetime.
local function cache_index(entry, value, ttl, prefix)
  local tags = cache_tags(value)
  if #tags == 0 then return end
  local now = now_ms()
  local score = '+inf'
  if ttl > 0 then score = now + ttl end
  for _, t in ipairs(tags) do
    cache_zadd_live(cache_tag_key(prefix, t), entry, score, ttl, now)
  end
end

-- Store `payload` (a full entry) under `entry` for `ttl` ms (0: no expiry), re-indexing tags
-- (the entry it replaces is read by the SET that writes it: its tags are dropped after).
local function cache_store(entry, payload, ttl, prefix)
  local old
  if ttl > 0 then
    old = redis.call('SET', entry, payload, 'PX', ttl, 'GET')
  else
    old = redis.call('SET', entry, payload, 'GET')
  end
  cache_untag(entry, old, prefix, nil)
  cache_index(entry, payload, ttl, prefix)
end
