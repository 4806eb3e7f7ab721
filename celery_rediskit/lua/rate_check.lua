-- Check a rate limiter and take its slots when allowed: GCRA (the generic cell rate algorithm),
-- one step on the server's clock, one key.
-- needs: _clock
-- KEYS[1] limiter  string "<tat> <interval> <burst> <rate>": tat is the theoretical arrival
--                  time (server clock, us): the bucket is full again at tat, so the key
--                  expires then (its state is the same as no key). interval, burst and rate
--                  are the last caller's, kept for reports.
-- ARGV[1] interval, us (integer >= 1): the rate's period divided by its limit
-- ARGV[2] burst (integer >= 1): how many checks may pass at once after an idle period
-- ARGV[3] cost (integer, 1 <= cost <= burst): slots this check takes
-- ARGV[4] max wait, us: 0 take slots only if free now; > 0 also reserve slots that come free
--         within that much time; -1 reserve however far away
-- ARGV[5] the rate as text ("100/m"), for reports
-- Returns {allowed, wait, remaining, now, tat}:
--   allowed 1: the slots are taken; they start `wait` us from now (0: at once, > 0: reserved);
--   allowed 0: nothing changed; a check of this cost would pass in `wait` us;
--   remaining: checks of cost 1 that would pass right after this one;
--   now: the server's clock (us); tat: the limiter's tat after the check (the grant's token).
-- No fixed window: a check passes when now >= tat + cost * interval - burst * interval, so no
-- window of length w ever holds more than burst + w / interval grants.
local interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local cost, max_wait = tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_us()
local tat = now
local stored = redis.call('GET', KEYS[1])
if stored then
  local t = tonumber(string.match(stored, '^(%d+)'))
  if t and t > now then tat = t end
end
local new_tat = tat + cost * interval
local wait = new_tat - burst * interval - now
if wait > 0 and (max_wait == 0 or (max_wait > 0 and wait > max_wait)) then
  return {0, wait, 0, now, tat}
end
if wait < 0 then wait = 0 end
-- %.0f: Lua's tostring would print 1.8e15 as "1.8e+15"; the rest is the caller's text as is.
redis.call('SET', KEYS[1], string.format('%.0f', new_tat) .. ' ' .. ARGV[1] .. ' ' .. ARGV[2]
           .. ' ' .. ARGV[5], 'PXAT', string.format('%.0f', math.ceil(new_tat / 1000)))
local remaining = math.floor((now - new_tat + burst * interval) / interval)
if remaining < 0 then remaining = 0 end
return {1, wait, remaining, now, new_tat}
