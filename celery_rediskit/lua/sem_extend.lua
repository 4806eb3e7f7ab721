-- Extend one holder's lease. Never re-creates a holder whose lease ended.
-- needs: _semaphore
-- KEYS[1] holders
-- ARGV[1] owner id, ARGV[2] ms, ARGV[3] "add" (to the remaining lease) or "set"
-- Returns the holder's remaining lease in ms after the change, or 0 when it holds no permit.
local now = now_ms()
sem_reap(KEYS[1], now)
local ends = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not ends then return 0 end
local base = now
if ARGV[3] == 'add' then base = tonumber(ends) end
redis.call('ZADD', KEYS[1], 'XX', base + tonumber(ARGV[2]), ARGV[1])
keep_until(KEYS[1], base + tonumber(ARGV[2]))
return base + tonumber(ARGV[2]) - now
