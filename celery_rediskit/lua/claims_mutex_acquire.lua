-- Write a task's claims record, then try its lock: one script (Celery layer, one server).
-- then: mutex_acquire
-- This file is a prefix: the loader appends mutex_acquire.lua, so the lock part is the mutex's
-- own code (same keys, arguments and result). On a Redis Cluster the record lives in another
-- slot than the lock: there the record's SET is sent beside the plain script instead.
-- KEYS[1..4] the lock's keys (lock, fence, queue, waiters; see mutex_acquire.lua)
-- KEYS[5]    the claims record, <prefix>:claims:<task id>
-- ARGV[1..6] as mutex_acquire.lua (owner, lease ms, "0" = just try, grace ms, channel prefix,
--            idle lifetime ms)
-- ARGV[7]    the record's text; ARGV[8] its lifetime, s
-- ARGV[9]    "always": write it; "free": only while the lock is free or the caller's (a lock
--            held by another run of the same task id keeps that run's record)
-- Returns: what mutex_acquire.lua returns (a token >= 1 when granted, else <= -1).
local record_holder = ARGV[9] == 'free' and redis.call('GET', KEYS[1])
if not record_holder or record_holder == ARGV[1] then
  redis.call('SET', KEYS[5], ARGV[7], 'EX', ARGV[8])
end
