-- Single-flight fill: store the computed entry (optionally), then release the fill lock.
-- needs: _cache_entry
-- then: mutex_release
-- This file is a prefix: the loader appends mutex_release.lua, so the release (owner check,
-- handing the lock to the first live waiter, waking it) is the mutex's.
-- KEYS[1..5] the fill lock's mutex keys and release record (see mutex_release.lua)
-- KEYS[6]    the entry
-- ARGV[1..7] as mutex_release.lua (owner, channel prefix, process id, force "0", idle ms,
--            release id, record ms)
-- ARGV[8]    "1" to store ARGV[9] as the entry, "0" to only release
-- ARGV[9]    the entry (as stored)
-- ARGV[10]   lifetime, ms; "0" for none
-- ARGV[11]   tag key prefix
-- Returns: what mutex_release.lua returns (0, 1, 2 or "<waiter> <token>" for a local waiter).
-- A re-send of a call that ran already (see mutex_release.lua) stores nothing again: the
-- entry may have been invalidated since.
if redis.call('GET', KEYS[1]) == ARGV[1] or redis.call('GET', KEYS[5]) ~= ARGV[6] then
  if ARGV[8] == '1' then
    cache_store(KEYS[6], ARGV[9], tonumber(ARGV[10]), ARGV[11])
  end
  -- Nobody queues: the fence key has no further use (cache locks are not fenced).
  if redis.call('LLEN', KEYS[3]) == 0 then redis.call('DEL', KEYS[2]) end
end
