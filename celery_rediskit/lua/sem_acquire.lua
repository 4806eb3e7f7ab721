-- Take a permit of a semaphore, or join its queue of waiters.
-- needs: _semaphore
-- KEYS[1] holders, KEYS[2] total, KEYS[3] initial, KEYS[4] queue, KEYS[5] waiters
--         (see _semaphore.lua)
-- KEYS[6] pinned, given only when ARGV[6] is the total the caller's code declares: that
--         total then replaces a different stored one, unless an operator set it (pinned
--         exists: it stays until reset, and reset then returns to the declared total)
-- ARGV[1] owner id ("<process id>:<n>")
-- ARGV[2] lease, ms
-- ARGV[3] "0" to just try; else the caller's number for this check-in (digits, >= 1): join
--         the queue when not granted (a grant message names the check-in it is dated from)
-- ARGV[4] grace, ms: how long past its bounded wait a queued waiter stays live unrefreshed
-- ARGV[5] wake channel prefix
-- ARGV[6] permits to initialise with when the semaphore does not exist yet
-- ARGV[7] idle lifetime, ms: total, initial and holders expire half to all of it after the
--         last acquire (holders never before the last holder's lease ends)
-- Returns 1 when the caller holds a permit for the lease from now (newly, or granted earlier by
--         a release: its lease end is then set to now + ARGV[2] again);
--         otherwise -1 - (ms until the nearest holder's lease ends; half the grace when no
--         holder bounds the wait), so the caller can bound its wait.
--         With KEYS[6], when the stored total differed from the declared one: {stored total,
--         1 if an operator set it else 0}, without acquiring (the caller notes it and asks
--         again without KEYS[6]).
local holders, total, initial, queue, waiters = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local owner, lease, grace = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[4])
local now = now_ms()

local idle = tonumber(ARGV[7])
-- The total, and whether an operator pinned it (KEYS[6], below), in one call.
local stored = KEYS[6] and redis.call('MGET', total, KEYS[6]) or {redis.call('GET', total)}
local cap = tonumber(stored[1])
if not cap then
  cap = tonumber(ARGV[6])  -- new, or expired while idle: the permits the caller declares
  redis.call('SET', total, cap, 'PX', idle)
  redis.call('SET', initial, cap, 'PX', idle)
elseif keep_for(total, 0, idle) then
  redis.call('PEXPIRE', initial, idle)
end
-- Expired holders give their permits back: swept when all permits look taken, and before the
-- queue is served. A count under the total needs no sweep (an expired holder still counted
-- only makes the count higher), which spares the uncontended acquire a command.
local swept = false

if KEYS[6] then  -- declared permits (see KEYS[6] above)
  local declared, pin = tonumber(ARGV[6]), KEYS[6]
  local pinned = stored[2] and 1 or 0
  if pinned == 1 then
    -- the mark lives no longer than the total: the same deadline, copied as an absolute
    -- time (a PTTL copied with PEXPIRE could land a millisecond later)
    local at = redis.call('PEXPIRETIME', total)
    if at > 0 then redis.call('PEXPIREAT', pin, at) end
    if tonumber(redis.call('GET', initial)) ~= declared then
      redis.call('SET', initial, declared, 'KEEPTTL')  -- what reset returns to
    end
  end
  if cap ~= declared then
    if pinned == 0 then  -- holders keep their permits; nobody new gets in while they exceed it
      redis.call('SET', total, declared, 'KEEPTTL')
      redis.call('SET', initial, declared, 'KEEPTTL')
    end
    return {cap, pinned}
  end
end

-- Fast path: nobody queues and a permit is free.
if redis.call('LLEN', queue) == 0 then
  local count = redis.call('ZCARD', holders)
  if count >= cap then
    count = count - redis.call('ZREMRANGEBYSCORE', holders, '-inf', now)
    swept = true
  end
  if count < cap then
    redis.call('ZADD', holders, now + lease, owner)
    keep_for(holders, lease, idle)
    return 1
  end
  if redis.call('ZSCORE', holders, owner) then  -- granted earlier: the full lease from now
    redis.call('ZADD', holders, 'XX', now + lease, owner)
    keep_for(holders, lease, idle)
    return 1
  end
end

-- libraries here

if not swept then redis.call('ZREMRANGEBYSCORE', holders, '-inf', now) end

if redis.call('ZSCORE', holders, owner) then  -- granted earlier: the full lease from now
  redis.call('ZADD', holders, 'XX', now + lease, owner)
  keep_for(holders, lease, idle)
  return 1
end

-- Free permits go to the queue first (also after a holder's lease ended), then to the caller.
sem_serve(holders, total, queue, waiters, now, ARGV[5], '')
if redis.call('ZSCORE', holders, owner) then return 1 end
if redis.call('LLEN', queue) == 0 and redis.call('ZCARD', holders) < cap then
  redis.call('ZADD', holders, now + lease, owner)
  keep_for(holders, lease, idle)
  return 1
end

local bound = math.floor(grace / 2)
local nearest = redis.call('ZRANGE', holders, 0, 0, 'WITHSCORES')
if nearest[2] then bound = math.max(0, tonumber(nearest[2]) - now) end
if ARGV[3] ~= '0' then
  wq_join(queue, waiters, owner, now + bound + grace, lease, now, ARGV[3])
end
return -1 - bound
