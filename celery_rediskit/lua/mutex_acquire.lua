-- Acquire a mutex, or join its queue of waiters.
-- needs: _fence
-- needs: _waitqueue
-- KEYS[1] lock     string: owner id, with the lease as its PX expiry
-- KEYS[2] fence    the last fencing token granted (see _fence.lua)
-- KEYS[3] queue    list of waiter ids
-- KEYS[4] waiters  hash waiter id -> "deadline:lease:check-in:check-in no." (_waitqueue.lua)
-- ARGV[1] owner id ("<process id>:<n>")
-- ARGV[2] lease, ms
-- ARGV[3] "0" to just try; else the caller's number for this check-in (digits, >= 1): join
--         the queue when not granted (a grant message names the check-in it is dated from)
-- ARGV[4] grace, ms: how long past the holder's lease a queued waiter stays live unrefreshed
-- ARGV[5] wake channel prefix
-- ARGV[6] idle lifetime, ms: the fence key outlives the last grant's lease by half to all of it
-- Returns: token >= 1 when the caller holds the lock for the lease from now (newly, or granted
--          earlier by a release: its lease is then set to ARGV[2] again);
--          otherwise -1 - (holder's remaining lease in ms), i.e. <= -1, so the caller can bound
--          its wait (half the grace when the holder has no expiry).
local lock, fence, queue, waiters = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local owner, lease = ARGV[1], tonumber(ARGV[2])

-- Fast path: nobody queues and the lock is free.
if redis.call('LLEN', queue) == 0 then
  if redis.call('SET', lock, owner, 'NX', 'PX', lease) then
    return fence_next(fence, lease, tonumber(ARGV[6]))
  end
end

-- libraries here

local holder = redis.call('GET', lock)
if holder == owner then
  -- Granted to us by a release while we waited: the full lease from now, however late we ask.
  redis.call('PEXPIRE', lock, lease)
  return tonumber(redis.call('GET', fence))
end
local now = nil
if not holder then
  -- Free, but others queue (e.g. the holder's lease just ended): serve the queue first.
  now = now_ms()
  local head, head_lease = wq_take(queue, waiters, now)
  if head == nil or head == owner then
    redis.call('SET', lock, owner, 'PX', lease)
    return fence_next(fence, lease, tonumber(ARGV[6]))
  end
  redis.call('SET', lock, head, 'PX', head_lease)
  -- No local shortcut here: the caller is a waiter itself, so always publish.
  wq_notify(ARGV[5], '', head, fence_next(fence, head_lease, tonumber(ARGV[6])))
end

local pttl = redis.call('PTTL', lock)
if pttl < 0 then pttl = math.floor(tonumber(ARGV[4]) / 2) end  -- no expiry (set by hand)
if ARGV[3] ~= '0' then
  now = now or now_ms()
  wq_join(queue, waiters, owner, now + pttl + tonumber(ARGV[4]), lease, now, ARGV[3])
end
return -1 - pttl
