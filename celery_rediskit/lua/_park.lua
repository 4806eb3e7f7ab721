-- Shared library: the parked tasks of one lock or semaphore (see parking/redis.py).
-- needs: _fence
-- needs: _expiry
-- Every park_* script takes the same keys, all with the resource's hash tag:
--   KEYS[1] the resource's holders: a lock's owner string, or a semaphore's holders zset
--   KEYS[2] a lock's fence key, or a semaphore's total
--   KEYS[3] parked   ZSET id -> turn (µs on the server's clock when the entry first parked)
--   KEYS[4] payloads HASH id -> payload (opaque bytes), while parked or sent
--   KEYS[5] sent     HASH id -> "<dispatch id>|<t or p>|<deadline ms>|<turn>": taken for
--           re-sending, with the lock or a permit reserved for owner "park:<dispatch id>";
--           "t" = taken, not yet known published (re-sent by a sweep past the deadline),
--           "p" = published (re-sent by a sweep past the deadline: the message was lost)
--   KEYS[6] seen     ZSET message id -> ms when it parked (recent parks: a redelivered copy
--           of a parked message is recognised)
-- Parked, payloads, sent and seen live the idle lifetime after their last write.

-- Permits (a lock: 0 or 1) free now; a semaphore's expired holders are dropped first.
-- `permits` is the total assumed when the semaphore has none stored.
local function pk_free(kind, now, permits)
  if kind == 'm' then
    if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
    return 1
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  local cap = tonumber(redis.call('GET', KEYS[2])) or permits
  return cap - redis.call('ZCARD', KEYS[1])
end

-- Make `owner` hold the lock (returns its fencing token) or a permit (returns 1).
local function pk_grant(kind, owner, now, lease, idle)
  if kind == 'm' then
    redis.call('SET', KEYS[1], owner, 'PX', lease)
    return fence_next(KEYS[2], lease, idle)
  end
  redis.call('ZADD', KEYS[1], now + lease, owner)
  keep_until(KEYS[1], now + lease)
  return 1
end

-- Keep the parking keys that exist alive for the idle lifetime.
local function pk_touch(idle)
  for i = 3, 6 do redis.call('PEXPIRE', KEYS[i], idle) end
end

-- Take up to `free` parked entries, oldest turn first (only those older than `before`, when
-- given): each gets the lock or a permit reserved and goes to `sent` as taken. Appends
-- id, payload, dispatch id, turn of each to `out`; returns the permits still free.
local function pk_take(kind, free, now, lease, idle, did_prefix, publish_ms, out, before)
  local n = 0
  while free > 0 do
    local head = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
    if not head[1] then break end
    if before and tonumber(head[2]) >= before then break end
    local id, turn = head[1], string.format('%.0f', tonumber(head[2]))
    redis.call('ZREM', KEYS[3], id)
    local payload = redis.call('HGET', KEYS[4], id)
    if payload then
      n = n + 1
      local did = did_prefix .. '.' .. n
      pk_grant(kind, 'park:' .. did, now, lease, idle)
      redis.call('HSET', KEYS[5], id, did .. '|t|' .. string.format('%.0f', now + publish_ms)
                 .. '|' .. turn)
      out[#out + 1] = id
      out[#out + 1] = payload
      out[#out + 1] = did
      out[#out + 1] = turn
      free = free - 1
    end
  end
  if n > 0 then pk_touch(idle) end
  return free
end
