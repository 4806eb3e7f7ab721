-- Shared library: the state of one semaphore (included after _waitqueue by scripts.py).
-- needs: _waitqueue
-- Keys (all with the semaphore's hash tag):
--   holders ZSET owner id -> lease end, ms on the server's clock; expires half to all of the
--           idle lifetime after the last acquire, never before the last lease end
--   total   string: the number of permits now; expires half to all of the idle lifetime
--           after the last acquire or admin change
--   initial string: the number of permits it was initialised with (for reset); same lifetime
--   queue / waiters: the FIFO of waiters (see _waitqueue.lua)
--   pinned  string, present while the total is one an operator set (sem_admin "init", "inc",
--           "dec"): acquires with declared permits leave it alone until "reset"

-- Drop holders whose lease ended; they give their permits back.
local function sem_reap(holders, now)
  redis.call('ZREMRANGEBYSCORE', holders, '-inf', now)
end

-- Hand free permits to live waiters, oldest first. Returns the waiters of the calling process
-- (to wake locally), as a list of "<waiter> 1" strings; others are told by PUBLISH.
local function sem_serve(holders, total, queue, waiters, now, chan_prefix, local_proc)
  local locals = {}
  local free = (tonumber(redis.call('GET', total)) or 0) - redis.call('ZCARD', holders)
  while free > 0 do
    local w, lease = wq_take(queue, waiters, now)
    if not w then break end
    redis.call('ZADD', holders, now + lease, w)
    keep_until(holders, now + lease)
    free = free - 1
    local msg = wq_notify(chan_prefix, local_proc, w, 1)
    if msg then locals[#locals + 1] = msg end
  end
  return locals
end

-- Mark the total as set by an operator (see "pinned" above). The mark lives no longer than
-- the total: it takes the total's expiry, if the total has one.
local function sem_pin(total, pinned)
  local at = redis.call('PEXPIRETIME', total)  -- absolute: a copied PTTL could end later
  if at > 0 then
    redis.call('SET', pinned, '1', 'PXAT', at)
  else
    redis.call('SET', pinned, '1')
  end
end
