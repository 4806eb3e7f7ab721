-- Give a permit back (owner-checked, idempotent) and hand freed permits to waiters.
-- Also how a waiter that gives up leaves the queue.
-- needs: _semaphore
-- KEYS[1] holders, KEYS[2] total, KEYS[3] initial, KEYS[4] queue, KEYS[5] waiters
-- ARGV[1] owner id
-- ARGV[2] wake channel prefix
-- ARGV[3] the calling process's id (its waiters are woken locally)
-- ARGV[4] "keep": a waiter giving up keeps a permit granted meanwhile (returns 2), "drop"
-- Returns 1 when the caller held a permit and gave it back, 0 when it held none, 2 when it
--   holds one and ARGV[4] is "keep"; followed by "<waiter> 1" strings for local waiters to
--   wake, when there are any (then the reply is a list).
local holders, total, queue, waiters = KEYS[1], KEYS[2], KEYS[4], KEYS[5]
local owner = ARGV[1]
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', holders, '-inf', now)  -- expired holders give their permits back

-- Fast path: nobody queues (so the caller is not queued either, and nobody is to be served).
if redis.call('LLEN', queue) == 0 then
  if ARGV[4] == 'keep' and redis.call('ZSCORE', holders, owner) then return 2 end
  return redis.call('ZREM', holders, owner)
end

-- libraries here

wq_leave(queue, waiters, owner)
if ARGV[4] == 'keep' and redis.call('ZSCORE', holders, owner) then return 2 end
local released = redis.call('ZREM', holders, owner)
local locals = sem_serve(holders, total, queue, waiters, now, ARGV[2], ARGV[3])
if #locals == 0 then return released end
table.insert(locals, 1, released)
return locals
