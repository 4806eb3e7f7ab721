-- A queued-scope run's claim and its lock's first try, in one script (Celery layer, one
-- server). The claim, taken when the task was sent, is renewed to the run's lease and its
-- token read (or taken anew, with a new token, when it expired while the message queued).
-- Then the lock is tried (mutex_acquire.lua) and, once it is the caller's, the run's claims
-- record written (a lock held by another delivery of the same task id keeps that run's
-- record). A duplicate (the claim another task id's) does nothing, so never holds the lock,
-- not even for a moment: a run holding its claim that meets the lock held concludes that
-- another delivery of its own task id runs, and is dropped.
-- wraps: mutex_acquire.lua: the loader (scripts.wrapped_script) puts its code in the
-- function wrapped() below.
-- needs: _fence
-- KEYS[1..4] the lock's keys (as mutex_acquire.lua)
-- KEYS[5]    the claims record, <prefix>:claims:<task id>
-- KEYS[6]    the claim's lock key (it holds the claim's owner id; see mutex_acquire.lua)
-- KEYS[7]    the claim's fence key
-- ARGV[1..6] as mutex_acquire.lua (ARGV[3] "0": a try; ARGV[6] the idle lifetime, ms)
-- ARGV[7]    the record's text; ARGV[8] its lifetime, s
-- ARGV[9]    the claim's owner id, "q:<task id>"
-- ARGV[10]   the claim's lease from now, ms
-- Returns: {0, 0} when the claim is another task's (nothing was done); else {the claim's
--          fencing token, what mutex_acquire.lua returns for the lock (a token >= 1 when
--          granted, else <= -1)}.
local claim, claim_fence, claim_owner = KEYS[6], KEYS[7], ARGV[9]
local claim_lease = tonumber(ARGV[10])
local holder = redis.call('GET', claim)
local claim_token = nil
if holder == claim_owner then
  redis.call('PEXPIRE', claim, claim_lease)
  claim_token = tonumber(redis.call('GET', claim_fence))
elseif holder then
  return {0, 0}
else  -- expired while the message queued: free, so the run's own again
  redis.call('SET', claim, claim_owner, 'PX', claim_lease)
end
if not claim_token then  -- taken anew (or its fence key gone): a new token
  claim_token = fence_next(claim_fence, claim_lease, tonumber(ARGV[6]))
end
-- the wrapped script here
local tried = wrapped()
if tried and tried >= 1 then redis.call('SET', KEYS[5], ARGV[7], 'EX', ARGV[8]) end
return {claim_token, tried}
