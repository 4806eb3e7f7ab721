-- Single-flight claim: return the entry if it exists, else try to take the entry's fill lock.
-- needs: _cache_entry
-- then: mutex_acquire
-- This file is a prefix: the loader appends mutex_acquire.lua, so the lock part is the mutex's
-- own code (same keys, arguments and result).
-- KEYS[1..4] the fill lock's mutex keys (lock, fence, queue, waiters; see mutex_acquire.lua)
-- KEYS[5]    the entry
-- ARGV[1..6] as mutex_acquire.lua (owner, lease ms, "0" = just try, grace ms, channel prefix,
--            idle lifetime ms)
-- Returns: the entry (a string) when present; otherwise what mutex_acquire.lua returns:
--          a token >= 1 when the caller now holds the fill lock, <= 0 when someone else does.
local cached = redis.call('GET', KEYS[5])
if cached then return cached end
