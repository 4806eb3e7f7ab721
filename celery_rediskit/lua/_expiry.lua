-- Shared library: key lifetimes.
-- early: fast paths grant, so they need this above them.
--
-- Every key the library writes expires (see _redis/keys.py for what lives how long). Setting
-- an expiry costs about as much as the rest of a fast path, so keys touched on every grant
-- renew theirs at most once per half of it (keep_for here). (A fence key gets its expiry in the
-- SET that writes each token: see _fence.lua.)

-- Keep `key` alive at least `ms` more: when less than `ms + spare / 2` is left (or it has no
-- expiry), make it `ms + spare`. Never shortens a later expiry. Returns true when renewed.
local function keep_for(key, ms, spare)
  if redis.call('PTTL', key) < ms + spare / 2 then
    redis.call('PEXPIRE', key, ms + spare)
    return true
  end
  return false
end

-- Make `key` live at least until `at` (ms since the epoch, server clock, later than now),
-- never shortening a later expiry. A key without one gets it.
local function keep_until(key, at)
  if redis.call('PEXPIREAT', key, at, 'GT') == 0 then
    redis.call('PEXPIREAT', key, at, 'NX')
  end
end
