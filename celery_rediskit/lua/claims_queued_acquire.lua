-- A queued-scope run's first lock try, sent right behind the try of its claim in the same
-- round trip (Celery layer, one server): only while that claim is the run's does it write the
-- claims record (while the lock is free or the caller's) and try the lock.
-- then: claims_mutex_acquire
-- This file is a prefix: the loader appends claims_mutex_acquire.lua, then mutex_acquire.lua
-- (same keys, arguments and result, plus the claim's). A duplicate (the claim held by another
-- task id) so never holds the lock, not even for a moment: a run holding its claim that meets
-- the lock held concludes that another delivery of its own task id runs, and is dropped.
-- KEYS[1..5] as claims_mutex_acquire.lua (the lock's keys, the claims record)
-- KEYS[6]    the queued claim's lock key (its owner id, see mutex_acquire.lua)
-- ARGV[1..9] as claims_mutex_acquire.lua (ARGV[9] "free")
-- ARGV[10]   the claim's owner id, "q:<task id>"
-- Returns: 0 when the claim is not the caller's (nothing was done); else what mutex_acquire.lua
--          returns (a token >= 1 when granted, else <= -1).
if redis.call('GET', KEYS[6]) ~= ARGV[10] then
  return 0
end
