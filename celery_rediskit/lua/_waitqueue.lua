-- Shared library: the FIFO queue of waiters of one lock or semaphore.
-- Included by scripts.py in every script whose header says "-- needs: _waitqueue".
-- needs: _clock
-- needs: _expiry
--
-- A queue is two keys with the resource's hash tag:
--   queue   LIST of waiter ids, oldest first
--   waiters HASH waiter id -> "<deadline>:<lease it asked for>:<last check-in>:<check-in no.>"
--           (ms; deadline and check-in on the server's clock; the number is the waiter's own
--           count of its attempts, echoed back so it knows which check-in a grant refers to)
-- Both expire at the latest deadline of a waiter that joined: past it, every waiter is dead.
-- A waiter id is "<process id>:<n>"; grants are published on <channel prefix><process id>
-- as "<waiter id> <token> <ms since the waiter's last check-in> <check-in no.>" (the waiter
-- knows when it sent that check-in, so it can date the grant without comparing clocks, even
-- when later check-ins were still on their way or a message was held up).
-- A waiter refreshes its entry each time it re-checks, so one that died drops out by itself
-- once its deadline passes.

local wq_since = {}  -- waiter id -> "<ms from its last check-in to now> <check-in no.>"

-- The first live waiter and the lease it asked for, taken out of the queue (to be served
-- now); dead ones met on the way are dropped.
local function wq_take(queue, waiters, now)
  while true do
    local w = redis.call('LPOP', queue)
    if not w then return nil, nil end
    local v = redis.call('HGET', waiters, w)
    redis.call('HDEL', waiters, w)
    if v then
      local deadline, lease, joined, n = string.match(v, '^(%d+):(%d+):?(%d*):?(%d*)$')
      if deadline and tonumber(deadline) > now then
        if n ~= '' then wq_since[w] = math.max(0, now - tonumber(joined)) .. ' ' .. n end
        return w, tonumber(lease)
      end
    end
  end
end

-- Add a waiter at the tail, or refresh its entry if it is queued already (now: its check-in,
-- n: the waiter's number for this check-in, digits).
local function wq_join(queue, waiters, w, deadline, lease, now, n)
  if redis.call('HSET', waiters, w, deadline .. ':' .. lease .. ':' .. now .. ':' .. n) == 1 then
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

-- Tell a waiter (just returned by wq_take) it was granted. Returns the message instead of
-- publishing it when the waiter lives in the calling process (local_proc), which then wakes it
-- without a network hop. A channel prefix carrying a hash tag is a Redis Cluster slot's
-- ("<prefix>:wake:{<slot tag>}:", the slot of the script's keys): the message goes out with
-- SPUBLISH, to that slot's shard only, not to every node of the cluster as PUBLISH would.
-- The token is written in full (%.0f): Lua's own number to text would round a 16-digit token.
local function wq_notify(chan_prefix, local_proc, w, token)
  local msg = w .. ' ' .. string.format('%.0f', token)
  if wq_since[w] then msg = msg .. ' ' .. wq_since[w] end
  local proc = string.match(w, '^[^:]+')
  if proc == local_proc then return msg end
  if string.find(chan_prefix, '{', 1, true) then
    redis.call('SPUBLISH', chan_prefix .. proc, msg)
  else
    redis.call('PUBLISH', chan_prefix .. proc, msg)
  end
  return nil
end
