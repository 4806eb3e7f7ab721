-- Give a permit back (owner-checked, idempotent) and hand freed permits to waiters.
-- Also how a waiter that gives up leaves the queue.
-- needs: _semaphore
-- KEYS[1] holders, KEYS[2] total, KEYS[3] initial, KEYS[4] queue, KEYS[5] waiters
-- KEYS[6] the calling thread's release record, "<semaphore>:released:<process id>/<thread>":
--         the id of its latest release of this semaphore (see _redis/release.py)
-- ARGV[1] owner id
-- ARGV[2] wake channel prefix
-- ARGV[3] the calling process's id (its waiters are woken locally); "-" (no process:
--         _redis/release.py NO_PROCESS) to wake every waiter by message
-- ARGV[4] "keep": a waiter giving up keeps a permit granted meanwhile (returns 2), "drop"
-- ARGV[5] release id: the same for every send of one release call, new for each call
-- ARGV[6] how long the record is kept, ms; "0": write none (a re-send then answers 0)
-- Returns 1 when the caller held a permit and gave it back, 0 when it held none, 2 when it
--   holds one and ARGV[4] is "keep"; followed by "<waiter> 1" strings for local waiters to
--   wake, when there are any (then the reply is a list).
--   A re-send of a release that ran already (ARGV[5] is in KEYS[6]) returns 1,
--   followed by "<holder> 1" for every holder of the calling process (the caller wakes those
--   still waiting: the lost reply may have been their grant).
local holders, total, queue, waiters, record = KEYS[1], KEYS[2], KEYS[4], KEYS[5], KEYS[6]
local owner = ARGV[1]
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', holders, '-inf', now)  -- expired holders give their permits back

-- Fast path: nobody queues (so the caller is not queued either, and nobody is to be served).
if redis.call('LLEN', queue) == 0 then
  if ARGV[4] == 'keep' and redis.call('ZSCORE', holders, owner) then return 2 end
  if redis.call('ZREM', holders, owner) == 1 then
    if ARGV[6] ~= '0' then redis.call('SET', record, ARGV[5], 'PX', ARGV[6]) end
    return 1
  end
  if redis.call('GET', record) ~= ARGV[5] then return 0 end
end

-- libraries here

if ARGV[4] == 'keep' and redis.call('ZSCORE', holders, owner) then return 2 end
local released = redis.call('ZREM', holders, owner)
-- A holder is never queued (popped when served): only a waiter giving up leaves the queue.
if released == 0 then wq_leave(queue, waiters, owner) end
local locals = sem_serve(holders, total, queue, waiters, now, ARGV[2], ARGV[3])
if released == 1 then
  if ARGV[6] ~= '0' then redis.call('SET', record, ARGV[5], 'PX', ARGV[6]) end
elseif redis.call('GET', record) == ARGV[5] then
  -- A re-send: this release ran already and its reply was lost.
  released, locals = 1, {}
  local mine = ARGV[3] .. ':'
  for _, h in ipairs(redis.call('ZRANGE', holders, 0, -1)) do
    if string.sub(h, 1, #mine) == mine then locals[#locals + 1] = h .. ' 1' end
  end
end
if #locals == 0 then return released end
table.insert(locals, 1, released)
return locals
