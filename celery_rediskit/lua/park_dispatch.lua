-- Re-send parked entries for the free permits of a lock or semaphore (after a release, and
-- from the sweeper), and with ARGV[7] "1" also entries sent earlier whose deadline passed
-- (their publisher died, the broker refused them, or the message was lost).
-- needs: _park
-- KEYS[1..7] see _park.lua
-- ARGV[1] kind "m" / "s"
-- ARGV[2] lease of a reservation, ms
-- ARGV[3] idle lifetime, ms
-- ARGV[4] a semaphore's total when none is stored
-- ARGV[5] dispatch id prefix (unique per call)
-- ARGV[6] publish deadline, ms
-- ARGV[7] "1": sweep (also re-send overdue sent entries, and drop the marks of entries sent
--         ahead whose deadline passed), "0": free permits only
-- ARGV[8] "1": also send entries ahead (up to one per permit), "0": not
-- ARGV[9] how long a published entry waits for its message, ms (an entry sent ahead that
--         gets its reservation here waits that long)
-- ARGV[10] wake channel prefix of the waiters of entries sent ahead
-- ARGV[11] ms a waiting entry sent ahead has to adopt the permit reserved for it here
-- Returns {entries left (parked + sent), id1, payload1, dispatch id1, turn1, ...}: the
-- entries to publish now (an overdue one keeps its dispatch id, its deadline moves on and its
-- reservation, if still held, is renewed).
local kind, sweep = ARGV[1], ARGV[7] == '1'
if redis.call('ZCARD', KEYS[3]) == 0 and (not sweep or redis.call('HLEN', KEYS[5]) == 0) then
  return {0}
end
local now = now_ms()
local lease, idle, publish_ms = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[6])
local out = {}
if sweep then
  local all = redis.call('HGETALL', KEYS[5])
  for i = 1, #all, 2 do
    local id, entry = all[i], all[i + 1]
    local did, deadline, turn = string.match(entry, '^([^|]*)|%a|(%d+)|(%d+)$')
    if did and tonumber(deadline) < now then
      local payload = redis.call('HGET', KEYS[4], id)
      if payload then
        redis.call('HSET', KEYS[5], id, did .. '|t|' .. string.format('%.0f', now + publish_ms)
                   .. '|' .. turn)
        local owner = 'park:' .. did
        if kind == 'm' then
          if redis.call('GET', KEYS[1]) == owner then redis.call('PEXPIRE', KEYS[1], lease) end
        elseif redis.call('ZSCORE', KEYS[1], owner) then
          redis.call('ZADD', KEYS[1], 'XX', now + lease, owner)
          keep_until(KEYS[1], now + lease)
        end
        out[#out + 1] = id
        out[#out + 1] = payload
        out[#out + 1] = did
        out[#out + 1] = turn
      else
        redis.call('HDEL', KEYS[5], id)
      end
    end
  end
  -- Entries sent ahead whose message never came, or whose waiter stopped checking in: a
  -- plain parked entry again (a later message of the old dispatch id is dropped as a copy).
  local ahead = redis.call('HGETALL', KEYS[7])
  for i = 1, #ahead, 2 do
    local deadline = string.match(ahead[i + 1], '^[^|]*|%a|(%d+)|')
    if not redis.call('ZSCORE', KEYS[3], ahead[i]) or tonumber(deadline or 0) < now then
      redis.call('HDEL', KEYS[7], ahead[i])
    end
  end
end
local free = pk_free(kind, now, tonumber(ARGV[4]))
pk_take(kind, free, now, lease, idle, ARGV[5], publish_ms, out, nil, tonumber(ARGV[9]),
        ARGV[10], tonumber(ARGV[11]))
if ARGV[8] == '1' then
  pk_ahead(pk_cap(kind, tonumber(ARGV[4])), now, idle, ARGV[5], publish_ms, out)
end
local reply = {redis.call('ZCARD', KEYS[3]) + redis.call('HLEN', KEYS[5])}
for i = 1, #out do reply[#reply + 1] = out[i] end
return reply
