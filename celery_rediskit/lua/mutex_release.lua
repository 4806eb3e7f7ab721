-- Release a mutex (owner-checked) and hand it straight to the first live waiter.
-- needs: _fence
-- needs: _waitqueue
-- KEYS[1] lock, KEYS[2] fence, KEYS[3] queue, KEYS[4] waiters (as in mutex_acquire.lua)
-- KEYS[5] the calling thread's release record, "<lock>:released:<process id>/<thread>":
--         the id of its latest release of this lock (see _redis/release.py)
-- ARGV[1] owner id; ignored when ARGV[4] is "1"
-- ARGV[2] wake channel prefix
-- ARGV[3] the calling process's id (a waiter of this process is woken locally); "-" (no
--         process: _redis/release.py NO_PROCESS) to wake every waiter by message
-- ARGV[4] "1" to force: release whoever holds it (admin), "0" to check the owner
-- ARGV[5] idle lifetime, ms (as ARGV[6] of mutex_acquire.lua: the fence key of a handoff)
-- ARGV[6] release id: the same for every send of one release call, new for each call
-- ARGV[7] how long the record is kept, ms; "0": write none (a re-send then answers 0)
-- Returns: 0 when the caller did not hold the lock (nothing changes but leaving the queue);
--          1 when released and nobody waits; 2 when handed to a waiter of another process;
--          "<waiter> <token>" when handed to a waiter of the calling process.
--          A re-send of a release that ran already (ARGV[6] is in KEYS[5]) changes
--          nothing and returns 1, or "<holder> <token>" when a holder of the calling process
--          now holds the lock (the caller wakes it if the lost reply was its grant).
local lock, fence, queue, waiters, record = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local owner = ARGV[1]
local holder = redis.call('GET', lock)

-- Fast path: the caller holds the lock and nobody queues.
if holder == owner and redis.call('LLEN', queue) == 0 then
  redis.call('DEL', lock)
  if ARGV[7] ~= '0' then redis.call('SET', record, ARGV[6], 'PX', ARGV[7]) end
  return 1
end

-- libraries here

if (ARGV[4] == '1' or holder ~= owner) and redis.call('GET', record) == ARGV[6] then
  -- A re-send: this release ran already and its reply was lost.
  local token = holder and redis.call('GET', fence)
  if token and string.match(holder, '^[^:]+') == ARGV[3] then return holder .. ' ' .. token end
  return 1
end
if not holder or (ARGV[4] ~= '1' and holder ~= owner) then
  -- Not the holder: a waiter giving up (or a late release); it leaves the queue. (A holder
  -- is never queued: it was popped when granted.)
  if ARGV[4] ~= '1' then wq_leave(queue, waiters, owner) end
  return 0
end
if ARGV[7] ~= '0' then redis.call('SET', record, ARGV[6], 'PX', ARGV[7]) end
local w, lease = wq_take(queue, waiters, now_ms())
if w then
  redis.call('SET', lock, w, 'PX', lease)
  local token = fence_next(fence, lease, tonumber(ARGV[5]))
  local handed = wq_notify(ARGV[2], ARGV[3], w, token)
  if handed then return handed end
  return 2
end
redis.call('DEL', lock)
return 1
