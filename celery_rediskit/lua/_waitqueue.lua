-- Shared library: the FIFO queue of waiters of one lock or semaphore.
-- Included by scripts.py in every script whose header says "-- needs: _waitqueue".
-- needs: _clock
-- needs: _expiry
--
-- A queue is two keys with the resource's hash tag:
--   queue   LIST of waiter ids, oldest first
--   waiters HASH waiter id -> "<deadline ms (server clock)>:<lease ms it asked for>"
-- Both expire at the latest deadline of a waiter that joined: past it, every waiter is dead.
-- A waiter id is "<process id>:<n>"; grants are published on <channel prefix><process id>
-- as "<waiter id> <token>". A waiter refreshes its deadline each time it re-checks, so one
-- that died drops out by itself once its deadline passes.

-- The first live waiter and the lease it asked for; dead ones met on the way are dropped.
-- The returned waiter stays in the queue: wq_pop removes it once it is served.
local function wq_head(queue, waiters, now)
  while true do
    local w = redis.call('LINDEX', queue, 0)
    if not w then return nil, nil end
    local v = redis.call('HGET', waiters, w)
    if v then
      local deadline, lease = string.match(v, '^(%d+):(%d+)$')
      if tonumber(deadline) > now then return w, tonumber(lease) end
    end
    redis.call('LPOP', queue)
    redis.call('HDEL', waiters, w)
  end
end

local function wq_pop(queue, waiters, w)
  redis.call('LPOP', queue)
  redis.call('HDEL', waiters, w)
end

-- Add a waiter at the tail, or refresh its deadline if it is queued already.
local function wq_join(queue, waiters, w, deadline, lease)
  if redis.call('HSET', waiters, w, deadline .. ':' .. lease) == 1 then
    redis.call('RPUSH', queue, w)
  end
  keep_until(queue, deadline)
  keep_until(waiters, deadline)
end

local function wq_leave(queue, waiters, w)
  if redis.call('HDEL', waiters, w) == 1 then
    redis.call('LREM', queue, 1, w)
  end
end

-- Tell a waiter it was granted. Returns "<waiter> <token>" instead of publishing when the
-- waiter lives in the calling process (local_proc), which then wakes it without a network hop.
-- The token is written in full (%.0f): Lua's own number to text would round a 16-digit token.
local function wq_notify(chan_prefix, local_proc, w, token)
  local proc = string.match(w, '^[^:]+')
  local msg = w .. ' ' .. string.format('%.0f', token)
  if proc == local_proc then return msg end
  redis.call('PUBLISH', chan_prefix .. proc, msg)
  return nil
end
