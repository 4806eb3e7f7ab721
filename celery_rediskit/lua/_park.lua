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
--   KEYS[7] ahead    HASH id -> "<dispatch id>|<A or a>|<deadline ms>|<turn>|<waiter id>":
--           parked entries whose message was sent ahead, before a permit frees, to wait in
--           a worker for the release (at most one per permit). They stay in `parked` at
--           their turn: when their turn comes with a free permit, the permit is reserved for
--           the dispatch id they were sent with and the waiter is told (no second message).
--           "A" = taken, not yet known published; "a" = published. `waiter` (once the
--           message arrived: "<process id>:park:<dispatch id>") is told on its process's
--           wake channel. Past the deadline a sweep drops the mark (the message or its
--           waiter is gone): the entry is a plain parked one again, and a copy that turns up
--           later is dropped (its dispatch id no longer matches).
-- Parked, payloads, sent, seen and ahead live the idle lifetime after their last write.

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

-- All permits of the resource (a lock: 1).
local function pk_cap(kind, permits)
  if kind == 'm' then return 1 end
  return tonumber(redis.call('GET', KEYS[2])) or permits
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
  for i = 3, 7 do redis.call('PEXPIRE', KEYS[i], idle) end
end

-- Tell the waiter of an entry sent ahead (if one waits) that its permit is reserved (token
-- >= 1) or that it must ask again (0), on its process's wake channel (wakeup.py's format).
local function pk_notify(chan_prefix, waiter, token)
  if waiter == nil or waiter == '' or chan_prefix == '' then return end
  local proc = string.match(waiter, '^[^:]+')
  local msg = waiter .. ' ' .. string.format('%.0f', token)
  if string.find(chan_prefix, '{', 1, true) then
    redis.call('SPUBLISH', chan_prefix .. proc, msg)
  else
    redis.call('PUBLISH', chan_prefix .. proc, msg)
  end
end

-- Take up to `free` parked entries, oldest turn first (only those older than `before`, when
-- given): each gets the lock or a permit reserved and goes to `sent` as taken. An entry sent
-- ahead keeps its dispatch id and message: its waiter is told, nothing is published (it goes
-- to `sent` as published, or as taken if its publish is not confirmed yet). A waiter has
-- `gone_ms` to adopt (else, dead, its message is re-sent by a sweep); a message not yet
-- arrived has `wait_ms`, as any published one. Appends id, payload, dispatch id, turn of
-- each entry to publish to `out`; returns the permits still free.
local function pk_take(kind, free, now, lease, idle, did_prefix, publish_ms, out, before,
                       wait_ms, chan_prefix, gone_ms)
  local n = 0
  local touched = false
  while free > 0 do
    local head = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
    if not head[1] then break end
    if before and tonumber(head[2]) >= before then break end
    local id, turn = head[1], string.format('%.0f', tonumber(head[2]))
    redis.call('ZREM', KEYS[3], id)
    touched = true
    local ahead = redis.call('HGET', KEYS[7], id)
    if ahead then
      redis.call('HDEL', KEYS[7], id)
      local did, state, _, _, waiter = string.match(ahead,
                                                     '^([^|]*)|(%a)|(%d+)|(%d+)|(.*)$')
      local token = pk_grant(kind, 'park:' .. did, now, lease, idle)
      if state == 'A' then
        redis.call('HSET', KEYS[5], id, did .. '|t|'
                   .. string.format('%.0f', now + publish_ms) .. '|' .. turn)
      elseif waiter ~= '' then
        redis.call('HSET', KEYS[5], id, did .. '|p|'
                   .. string.format('%.0f', now + gone_ms) .. '|' .. turn)
      else
        redis.call('HSET', KEYS[5], id, did .. '|p|'
                   .. string.format('%.0f', now + wait_ms) .. '|' .. turn)
      end
      pk_notify(chan_prefix, waiter, token)
      free = free - 1
    else
      local payload = redis.call('HGET', KEYS[4], id)
      if payload then
        n = n + 1
        local did = did_prefix .. '.' .. n
        pk_grant(kind, 'park:' .. did, now, lease, idle)
        redis.call('HSET', KEYS[5], id, did .. '|t|'
                   .. string.format('%.0f', now + publish_ms) .. '|' .. turn)
        out[#out + 1] = id
        out[#out + 1] = payload
        out[#out + 1] = did
        out[#out + 1] = turn
        free = free - 1
      end
    end
  end
  if touched then pk_touch(idle) end
  return free
end

-- Send parked entries ahead, oldest turn first, until `cap` entries are sent ahead: each is
-- marked in `ahead` as taken ("A") under a new dispatch id and stays parked at its turn.
-- Appends id, payload, dispatch id, turn of each to `out`.
local function pk_ahead(cap, now, idle, did_prefix, publish_ms, out)
  local want = cap - redis.call('HLEN', KEYS[7])
  if want <= 0 then return end
  local n = 0
  local heads = redis.call('ZRANGE', KEYS[3], 0, cap - 1, 'WITHSCORES')
  for i = 1, #heads, 2 do
    if n >= want then break end
    local id = heads[i]
    if redis.call('HEXISTS', KEYS[7], id) == 0 then
      local payload = redis.call('HGET', KEYS[4], id)
      if payload then
        n = n + 1
        local did, turn = did_prefix .. '.a' .. n, string.format('%.0f', tonumber(heads[i + 1]))
        redis.call('HSET', KEYS[7], id, did .. '|A|'
                   .. string.format('%.0f', now + publish_ms) .. '|' .. turn .. '|')
        out[#out + 1] = id
        out[#out + 1] = payload
        out[#out + 1] = did
        out[#out + 1] = turn
      end
    end
  end
  if n > 0 then pk_touch(idle) end
end
