-- Renew many leases in one round trip (the process-wide renewer calls this once per tick).
-- KEYS[i]  the i-th lease's key: a mutex's lock key, or a semaphore's holders zset
-- ARGV     per lease, three values: kind ("m" mutex, "s" semaphore), owner id, lease ms
-- A lease is renewed only while its owner still holds it: a lock that expired or changed hands,
-- or a semaphore holder that was reaped or whose lease end passed, is never re-created.
-- Returns a list: 1 renewed, 0 lost, in the order of KEYS.
-- needs: _clock
-- needs: _expiry
local out = {}
local now = nil
for i = 1, #KEYS do
  local kind, owner, ms = ARGV[3 * i - 2], ARGV[3 * i - 1], tonumber(ARGV[3 * i])
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
  out[i] = ok
end
return out
