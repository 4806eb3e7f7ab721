-- A waiter gives up (timeout): leave the queue, unless a release granted it the lock meanwhile.
-- needs: _waitqueue
-- KEYS[1] lock, KEYS[2] fence, KEYS[3] queue, KEYS[4] waiters (as in mutex_acquire.lua)
-- ARGV[1] owner id
-- Returns: the fencing token when the caller holds the lock after all (it keeps it), else 0.
local lock, fence, queue, waiters = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
if redis.call('GET', lock) == ARGV[1] then
  return tonumber(redis.call('GET', fence))
end
wq_leave(queue, waiters, ARGV[1])
return 0
