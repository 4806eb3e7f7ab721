-- A re-sent entry arrives: it takes over the lock or permit reserved for it; or, sent ahead
-- of its turn, it waits for it (or gives up waiting).
-- needs: _park
-- KEYS[1..7] see _park.lua
-- ARGV[1] kind "m" / "s"
-- ARGV[2] id
-- ARGV[3] dispatch id the message carries
-- ARGV[4] lease, ms: the reservation's lease from now
-- ARGV[5] for an entry sent ahead: "wait" (the caller waits: ARGV[6] its waiter id, told
--         on its wake channel when the permit is reserved; ARGV[7] ms until a sweep may
--         count the waiter gone unless it checks in again), "leave" (the caller stops
--         waiting: the entry stays parked at its turn, to be re-sent when a permit frees;
--         if its permit was reserved meanwhile, it is adopted) or "abandon" (the caller
--         fails: as "leave", but a permit reserved meanwhile is not adopted: its entry is
--         made overdue, so the next sweep re-sends it)
-- Returns the fencing token (a lock) or 1 (a permit) when adopted: owner "park:<dispatch id>"
-- now holds it for the lease; 0 when the entry was this message's but its reservation ended
-- (it waited too long: the caller asks again, keeping its turn); -1 when the entry is gone or
-- was sent under another dispatch id (this message is a copy that must not run); -2 when it
-- was sent ahead and waits (ARGV[5] "wait"); -3 when it stopped waiting ("leave",
-- "abandon").
local kind, id, did = ARGV[1], ARGV[2], ARGV[3]
local entry = redis.call('HGET', KEYS[5], id)
if not entry then
  local ahead = redis.call('HGET', KEYS[7], id)
  if not ahead or string.match(ahead, '^([^|]*)|') ~= did then return -1 end
  if ARGV[5] == 'wait' then
    local turn = string.match(ahead, '^[^|]*|%a|%d+|(%d+)|')
    redis.call('HSET', KEYS[7], id, did .. '|a|'
               .. string.format('%.0f', now_ms() + tonumber(ARGV[7])) .. '|' .. turn .. '|'
               .. ARGV[6])
    return -2
  end
  redis.call('HDEL', KEYS[7], id)
  return -3
end
if string.match(entry, '^([^|]*)|') ~= did then return -1 end
if ARGV[5] == 'abandon' then
  -- the caller fails while its permit was being reserved: a sweep re-sends it at once
  local state, turn = string.match(entry, '^[^|]*|(%a)|%d+|(%d+)$')
  redis.call('HSET', KEYS[5], id, did .. '|' .. state .. '|0|' .. turn)
  return -3
end
redis.call('HDEL', KEYS[5], id)
redis.call('HDEL', KEYS[4], id)
local owner, lease = 'park:' .. did, tonumber(ARGV[4])
if kind == 'm' then
  if redis.call('GET', KEYS[1]) ~= owner then return 0 end
  redis.call('PEXPIRE', KEYS[1], lease)
  return tonumber(redis.call('GET', KEYS[2])) or 1
end
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], owner) then return 0 end
redis.call('ZADD', KEYS[1], 'XX', now + lease, owner)
keep_until(KEYS[1], now + lease)
return 1
