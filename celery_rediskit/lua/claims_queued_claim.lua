-- Take a queued-scope claim at apply_async and write the task's claims record: one script
-- (Celery layer, one server).
-- needs: _fence
-- A claim is only ever tried, never waited for, so there is no queue to serve first: this is
-- mutex_acquire.lua's try without its queue check. The record is written once the claim is
-- the caller's (taken now, or held already: the re-send of a retry), never over the record of
-- a task holding it.
-- KEYS[1..4] the claim's keys (lock, fence, queue, waiters: as mutex_acquire.lua; the queue
--            and the waiters are not read)
-- KEYS[5]    the claims record, <prefix>:claims:<task id>
-- ARGV[1..6] as mutex_acquire.lua (owner, lease ms, "0", grace ms, channel prefix, idle
--            lifetime ms)
-- ARGV[7]    the record's text; ARGV[8] its lifetime, s
-- Returns: as mutex_acquire.lua: a token >= 1 when the caller holds the claim for the lease
--          from now, else -1 - (the holder's remaining lease in ms).
local lock, fence, record = KEYS[1], KEYS[2], KEYS[5]
local owner, lease = ARGV[1], tonumber(ARGV[2])
if redis.call('SET', lock, owner, 'NX', 'PX', lease) then
  redis.call('SET', record, ARGV[7], 'EX', ARGV[8])
  return fence_next(fence, lease, tonumber(ARGV[6]))
end
if redis.call('GET', lock) == owner then
  redis.call('SET', record, ARGV[7], 'EX', ARGV[8])
  redis.call('PEXPIRE', lock, lease)
  return tonumber(redis.call('GET', fence))
end
local pttl = redis.call('PTTL', lock)
if pttl < 0 then pttl = math.floor(tonumber(ARGV[4]) / 2) end  -- no expiry (set by hand)
return -1 - pttl
