-- Shared library: the server's clock, the one time source of every script.
-- early: the loader puts this library at the top of a script, above its fast path (it is one
-- small function, and fast paths need the clock).
-- Returns from now_us(): microseconds since the epoch on the Redis server's clock (TIME);
-- about 1.8e15 in 2027, exact in a Lua number (a double is exact below 2^53, about 9e15).
-- Returns from now_ms(): the same in milliseconds (rounded down).
-- One script reads the clock once (a TIME call less wherever it needs the time twice, as a
-- hand-over does: the waiters' deadlines, then the fencing token): a script is atomic, so
-- nothing it does can tell the two readings apart, and fence_next still counts on from the
-- last token when the clock has not moved.

local clock_us = nil
local function now_us()
  if not clock_us then
    local t = redis.call('TIME')
    clock_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
  end
  return clock_us
end

local function now_ms()
  return math.floor(now_us() / 1000)
end
