-- Shared library: fencing tokens.
-- early: the mutex's fast path grants, so it needs this above its fast path.
-- needs: _clock
--
-- A lock's fence key holds the last token granted for it. The next token is
--   max(last + 1, the server's clock in microseconds)
-- so tokens rise with every grant while the fence key exists, and keep rising when it is gone
-- (restart without persistence, FLUSHDB, eviction, idle expiry, a failover to a replica that
-- missed the last grants) as long as the server's clock is past the earlier grants'.
-- Tokens stay below 2^53, so they are exact as Lua numbers and in the integer reply.

-- Grant the next token of `fence`, which then lives `keep_ms` (ms) unless granted again.
-- Returns the token (a number).
local function fence_next(fence, keep_ms)
  local token = now_us()
  -- One SET both stores the clock and reads the last token; the rare case where the last
  -- token is not below the clock (the clock went back, two grants in one microsecond)
  -- writes again. string.format: tostring would print 1.8e15 as "1.8e+15".
  local last = tonumber(redis.call('SET', fence, string.format('%.0f', token), 'PX', keep_ms,
                                    'GET'))
  if last and last >= token then
    token = last + 1
    redis.call('SET', fence, string.format('%.0f', token), 'PX', keep_ms)
  end
  return token
end
