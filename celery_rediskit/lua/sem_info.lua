-- Read a semaphore's state in one consistent step (expired holders are reaped first).
-- needs: _semaphore
-- KEYS[1] holders, KEYS[2] total, KEYS[3] initial, KEYS[4] pinned
-- Returns {total or false, initial or false, server time ms, 1 if an operator set the total
--          else 0, owner1, end1, owner2, end2, ...}
local now = now_ms()
sem_reap(KEYS[1], now)
local out = {redis.call('GET', KEYS[2]), redis.call('GET', KEYS[3]), now,
             redis.call('EXISTS', KEYS[4])}
local held = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 1, #held do out[#out + 1] = held[i] end
return out
