-- Shared library: key lifetimes.
-- early: the semaphore's fast path adds a holder, so it needs this above its fast path.
--
-- Every key the library writes expires. Keys whose content ends at known times (a semaphore's
-- holders, a queue of waiters) live until the last of those times; see _redis/keys.py.

-- Make `key` live at least until `at` (ms since the epoch, server clock, later than now),
-- never shortening a later expiry. A key without one gets it.
local function keep_until(key, at)
  if redis.call('PEXPIREAT', key, at, 'GT') == 0 then
    redis.call('PEXPIREAT', key, at, 'NX')
  end
end
