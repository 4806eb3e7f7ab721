-- Extend a mutex's lease. Never re-creates a lock that expired.
-- KEYS[1] lock
-- ARGV[1] owner id, or "" for whoever holds it (admin extend_lock)
-- ARGV[2] ms
-- ARGV[3] "add": add ms to the remaining lease; "set": make the remaining lease ms
-- Returns 1 when extended, 0 when the lock is not held (by that owner).
local holder = redis.call('GET', KEYS[1])
if not holder or (ARGV[1] ~= '' and holder ~= ARGV[1]) then return 0 end
local ms = tonumber(ARGV[2])
if ARGV[3] == 'add' then
  local pttl = redis.call('PTTL', KEYS[1])
  if pttl > 0 then ms = ms + pttl end
end
redis.call('PEXPIRE', KEYS[1], ms)
return 1
