-- Release a mutex (owner-checked) and hand it straight to the first live waiter.
-- needs: _fence
-- needs: _waitqueue
-- KEYS[1] lock, KEYS[2] fence, KEYS[3] queue, KEYS[4] waiters (as in mutex_acquire.lua)
-- ARGV[1] owner id; ignored when ARGV[4] is "1"
-- ARGV[2] wake channel prefix
-- ARGV[3] the calling process's id (a waiter of this process is woken locally)
-- ARGV[4] "1" to force: release whoever holds it (admin), "0" to check the owner
-- ARGV[5] idle lifetime, ms (as ARGV[6] of mutex_acquire.lua: the fence key of a handoff)
-- Returns: 0 when the caller did not hold the lock (nothing changes but leaving the queue);
--          1 when released and nobody waits; 2 when handed to a waiter of another process;
--          "<waiter> <token>" when handed to a waiter of the calling process.
local lock, fence, queue, waiters = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local owner = ARGV[1]
local holder = redis.call('GET', lock)

-- Fast path: nobody queues (so the caller is not queued either).
if redis.call('LLEN', queue) == 0 then
  if not holder or (ARGV[4] ~= '1' and holder ~= owner) then return 0 end
  redis.call('DEL', lock)
  return 1
end

-- libraries here

if not holder or (ARGV[4] ~= '1' and holder ~= owner) then
  -- Not the holder: a waiter giving up (or a late release); it leaves the queue. (A holder
  -- is never queued: it was popped when granted.)
  if ARGV[4] ~= '1' then wq_leave(queue, waiters, owner) end
  return 0
end
local w, lease = wq_head(queue, waiters, now_ms())
if w then
  wq_pop(queue, waiters, w)
  redis.call('SET', lock, w, 'PX', lease)
  local token = fence_next(fence, lease, tonumber(ARGV[5]))
  local handed = wq_notify(ARGV[2], ARGV[3], w, token)
  if handed then return handed end
  return 2
end
redis.call('DEL', lock)
return 1
