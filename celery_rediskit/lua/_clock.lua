-- Shared library: the server's clock, the one time source of every script.
-- early: the loader puts this library at the top of a script, above its fast path (it is one
-- small function, and fast paths need the clock).
-- Returns from now_ms(): milliseconds since the epoch on the Redis server's clock (TIME).

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
