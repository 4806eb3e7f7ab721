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
-- Cluster: tag keys are built here from the tag prefix, so these scripts need every key on
-- one node; the provider refuses tags on a Redis Cluster client (see redis_provider.py).

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

local function cache_tag_key(prefix, tag)
  return prefix .. '{' .. tag .. '}'
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
    local tk = cache_tag_key(prefix, t)
    redis.call('ZREMRANGEBYSCORE', tk, '-inf', now)
    local pttl = redis.call('PTTL', tk) -- after the trim, which may have deleted the set
    redis.call('ZADD', tk, score, entry)
    if ttl <= 0 then
      redis.call('PERSIST', tk)
    elseif pttl == -2 or (pttl >= 0 and pttl < ttl) then
      redis.call('PEXPIRE', tk, ttl)
    end
  end
end

-- Store `payload` (a full entry) under `entry` for `ttl` ms (0: no expiry), re-indexing tags.
local function cache_store(entry, payload, ttl, prefix)
  cache_untag(entry, redis.call('GET', entry), prefix, nil)
  if ttl > 0 then
    redis.call('SET', entry, payload, 'PX', ttl)
  else
    redis.call('SET', entry, payload)
  end
  cache_index(entry, payload, ttl, prefix)
end
