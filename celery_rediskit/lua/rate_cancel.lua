-- Give back the slots of a grant nobody used (an aborted wait, a task sent back by a lock),
-- if no later grant was made since: only then are they the last slots, and freeing them can
-- never let two grants share a slot.
-- needs: _clock
-- KEYS[1] limiter  (see rate_check.lua)
-- ARGV[1] the grant's token: the limiter's tat right after it (integer us, as text)
-- ARGV[2] the slots' length, us: cost * interval of the grant
-- Returns 1 when given back, 0 when a later grant was made (or the key is gone).
local stored = redis.call('GET', KEYS[1])
if not stored then return 0 end
local tat, rest = string.match(stored, '^(%d+)(.*)$')
if tat ~= ARGV[1] then return 0 end
local back = tonumber(tat) - tonumber(ARGV[2])
if back <= now_us() then
  redis.call('DEL', KEYS[1])  -- the bucket is full again: the same as no key
else
  redis.call('SET', KEYS[1], string.format('%.0f', back) .. rest,
             'PXAT', string.format('%.0f', math.ceil(back / 1000)))
end
return 1
