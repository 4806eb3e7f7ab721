-- Take a lock or permit, or park the caller's payload in its FIFO: one atomic step, so a
-- release between a failed try and the park cannot be missed.
-- needs: _park
-- KEYS[1..7] see _park.lua
-- ARGV[1]  kind: "m" lock, "s" semaphore
-- ARGV[2]  id of the entry (a task id)
-- ARGV[3]  owner id to grant to
-- ARGV[4]  lease, ms (of a grant, and of reservations made for older entries)
-- ARGV[5]  idle lifetime, ms
-- ARGV[6]  a semaphore's total when none is stored
-- ARGV[7]  payload; "" to only ask (nothing parks: returns -2 when it would)
-- ARGV[8]  turn (µs) the entry keeps from an earlier park; "" for a new one (now)
-- ARGV[9]  dispatch id prefix (unique per call) for entries taken here
-- ARGV[10] publish deadline, ms: how long a taken entry may stay unpublished
-- ARGV[11] message id, remembered in `seen` when it parks
-- ARGV[12] how long `seen` remembers, ms
-- ARGV[13] how long a published entry waits for its message, ms
-- ARGV[14] wake channel prefix of the waiters of entries sent ahead (see _park.lua)
-- ARGV[15] ms a waiting entry sent ahead has to adopt the permit reserved for it here
-- ARGV[16] "1": park only if full: when a permit is free, change nothing and return 2 (the
--          caller then takes it the ordinary way); else "" (take it, or park)
-- Free permits go to parked entries older than the caller first (reserved for them: the
-- caller publishes them). Returns {status, token, id1, payload1, dispatch id1, turn1, ...}:
-- status 1 granted (token: the fencing token, or 1 for a permit), 0 parked, -1 the id is
-- parked or sent already (a copy, or a re-send of this call after a lost reply: nothing
-- changed), -2 would park but no payload was given, 2 a permit is free (ARGV[16] only:
-- nothing changed but a semaphore's expired holders dropped). A re-send of a call that granted returns
-- the grant again.
local kind, id = ARGV[1], ARGV[2]
-- A re-send of a call that granted already (its reply was lost): the grant stands.
if kind == 'm' then
  if redis.call('GET', KEYS[1]) == ARGV[3] then
    return {1, tonumber(redis.call('GET', KEYS[2])) or 1}
  end
elseif redis.call('ZSCORE', KEYS[1], ARGV[3]) then
  return {1, 1}
end
if redis.call('ZSCORE', KEYS[3], id) or redis.call('HEXISTS', KEYS[5], id) == 1 then
  return {-1, 0}
end
local now_u = now_us()
local now = math.floor(now_u / 1000)
local lease, idle = tonumber(ARGV[4]), tonumber(ARGV[5])
local turn = tonumber(ARGV[8]) or now_u
local out = {}
local free = pk_free(kind, now, tonumber(ARGV[6]))
if ARGV[16] == '1' and free > 0 then return {2, 0} end
free = pk_take(kind, free, now, lease, idle, ARGV[9], tonumber(ARGV[10]), out, turn,
               tonumber(ARGV[13]), ARGV[14], tonumber(ARGV[15]))
local status, token = 0, 0
if free > 0 then
  status, token = 1, pk_grant(kind, ARGV[3], now, lease, idle)
elseif ARGV[7] == '' then
  status = -2
else
  redis.call('ZADD', KEYS[3], string.format('%.0f', turn), id)
  redis.call('HSET', KEYS[4], id, ARGV[7])
  redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', now - tonumber(ARGV[12]))
  redis.call('ZADD', KEYS[6], now, ARGV[11])
  pk_touch(idle)
end
local reply = {status, token}
for i = 1, #out do reply[#reply + 1] = out[i] end
return reply
