-- Take a queued-scope claim at apply_async and write the task's claims record: one script
-- (Celery layer, one server).
-- then: mutex_acquire
-- needs: _fence
-- This file is a prefix: the loader appends mutex_acquire.lua (same keys and arguments first,
-- same result). A claim is only ever tried, never waited for, so a free claim is taken here
-- without the queue's check (two calls fewer than claims_mutex_acquire.lua in "free" mode).
-- Else the record is written if the claim is the caller's already (the re-send of a retry),
-- never over the record of a task holding it, and the mutex's own code answers.
-- KEYS[1..4] the claim's keys (lock, fence, queue, waiters: as mutex_acquire.lua)
-- KEYS[5]    the claims record, <prefix>:claims:<task id>
-- ARGV[1..6] as mutex_acquire.lua (owner, lease ms, "0", grace ms, channel prefix, idle
--            lifetime ms)
-- ARGV[7]    the record's text; ARGV[8] its lifetime, s
-- Returns: what mutex_acquire.lua returns (a token >= 1 when the caller holds the claim for
--          the lease from now, else <= -1).
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  redis.call('SET', KEYS[5], ARGV[7], 'EX', ARGV[8])
  return fence_next(KEYS[2], tonumber(ARGV[2]), tonumber(ARGV[6]))
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[5], ARGV[7], 'EX', ARGV[8])
end
