-- Change a semaphore's permits; waiters are served at once when permits were freed.
-- needs: _semaphore
-- KEYS[1] holders, KEYS[2] total, KEYS[3] initial, KEYS[4] queue, KEYS[5] waiters,
-- KEYS[6] pinned (see _semaphore.lua)
-- ARGV[1] operation ("init", "inc" and "dec" pin the total: acquires with declared permits
--         leave it alone until "reset"):
--   "init" n      set total and initial to n (holders are kept; if they exceed n, nobody new
--                 gets in until enough leave)
--   "inc" n       total + n (initialising with ARGV[4] first if missing)
--   "dec" n       total - n, never below 0 (initialising with ARGV[4] first if missing)
--   "reset"       total back to initial and unpinned; holders kept
--   "clear"       delete the semaphore; its holders find their permits lost
-- ARGV[2] n, ARGV[3] wake channel prefix, ARGV[4] permits to initialise with
-- ARGV[5] idle lifetime, ms: total and initial expire this long after the change
-- Returns the total after the change (0 after clear; -1 for reset of a missing semaphore).
local holders, total, initial, queue, waiters = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local pinned = KEYS[6]
local op, n = ARGV[1], tonumber(ARGV[2])

if op == 'clear' then
  redis.call('DEL', holders, total, initial, queue, waiters, pinned)
  return 0
end
local now = now_ms()
sem_reap(holders, now)
if op == 'init' then
  redis.call('SET', total, n)
  redis.call('SET', initial, n)
elseif op == 'reset' then
  redis.call('DEL', pinned)  -- declared permits apply again at the next acquire
  local first = redis.call('GET', initial)
  if not first then return -1 end
  redis.call('SET', total, first)
else
  if redis.call('SET', total, ARGV[4], 'NX') then redis.call('SET', initial, ARGV[4]) end
  if op == 'inc' then
    redis.call('INCRBY', total, n)
  else
    local left = math.max(0, tonumber(redis.call('GET', total)) - n)
    redis.call('SET', total, left)
  end
end
redis.call('PEXPIRE', total, ARGV[5])
redis.call('PEXPIRE', initial, ARGV[5])
sem_serve(holders, total, queue, waiters, now, ARGV[3], '')
if op ~= 'reset' then sem_pin(total, pinned) end  -- last: it takes the total's expiry
return tonumber(redis.call('GET', total))
