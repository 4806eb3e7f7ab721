-- Renew many leases in one round trip (the process-wide renewer calls this once per tick).
-- KEYS     first the n leases' keys, in order (a mutex's lock key, or a semaphore's holders
--          zset); then the leases' companion keys, those of lease 1 first, then lease 2's, ...
-- ARGV     per lease, four values: kind ("m" mutex, "s" semaphore), owner id, lease ms, and
--          how many of the companion keys are its own (0 or more); n = #ARGV / 4
-- A lease is renewed only while its owner still holds it: a lock that expired or changed hands,
-- or a semaphore holder that was reaped or whose lease end passed, is never re-created.
-- A renewed lease's companion keys (records that must live as long as it) then expire in no
-- less than its lease: PEXPIRE GT, so a longer expiry is kept, a key without one keeps none,
-- and a missing key is not created. A lost lease's companions are left alone.
-- Returns a list: 1 renewed, 0 lost, in the order of the leases.
-- needs: _clock
-- needs: _expiry
local out = {}
local now = nil
local n = #ARGV / 4
local c = n  -- the last companion key taken
for i = 1, n do
  local kind, owner, ms = ARGV[4 * i - 3], ARGV[4 * i - 2], tonumber(ARGV[4 * i - 1])
  local ok = 0
  if kind == 'm' then
    if redis.call('GET', KEYS[i]) == owner then
      redis.call('PEXPIRE', KEYS[i], ms)
      ok = 1
    end
  else
    if not now then now = now_ms() end
    local ends = redis.call('ZSCORE', KEYS[i], owner)
    if ends and tonumber(ends) > now then
      redis.call('ZADD', KEYS[i], 'XX', now + ms, owner)
      keep_until(KEYS[i], now + ms)  -- the holders key outlives every lease in it
      ok = 1
    end
  end
  local extra = tonumber(ARGV[4 * i])
  if ok == 1 then
    for j = c + 1, c + extra do
      redis.call('PEXPIRE', KEYS[j], ms, 'GT')
    end
  end
  c = c + extra
  out[i] = ok
end
return out
