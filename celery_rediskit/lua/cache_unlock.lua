-- Single-flight fill: store the computed entry (optionally), then release the fill lock.
-- needs: _cache_entry
-- then: mutex_release
-- This file is a prefix: the loader appends mutex_release.lua, so the release (owner check,
-- handing the lock to the first live waiter, waking it) is the mutex's.
-- KEYS[1..4] the fill lock's mutex keys (lock, fence, queue, waiters; see mutex_release.lua)
-- KEYS[5]    the entry
-- ARGV[1..5] as mutex_release.lua (owner, channel prefix, process id, force "0", idle ms)
-- ARGV[6]    "1" to store ARGV[7] as the entry, "0" to only release
-- ARGV[7]    the entry (as stored)
-- ARGV[8]    lifetime, ms; "0" for none
-- ARGV[9]    tag key prefix
-- Returns: what mutex_release.lua returns (0, 1, 2 or "<waiter> <token>" for a local waiter).
if ARGV[6] == '1' then
  cache_store(KEYS[5], ARGV[7], tonumber(ARGV[8]), ARGV[9])
end
-- Nobody queues: the fence key has no further use (cache locks are not fenced).
if redis.call('LLEN', KEYS[3]) == 0 then redis.call('DEL', KEYS[2]) end
