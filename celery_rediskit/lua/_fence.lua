-- Shared library: fencing tokens.
-- early: the mutex's fast path grants, so it needs this above its fast path.
-- needs: _clock
-- needs: _expiry
--
-- A lock's fence key holds the last token granted for it. The next token is
--   max(last + 1, the server's clock in microseconds)
-- so tokens rise with every grant while the fence key exists, and keep rising when it is gone
-- (restart without persistence, FLUSHDB, eviction, idle expiry, a failover to a replica that
-- missed the last grants) as long as the server's clock is past the earlier grants'.
-- Tokens stay below 2^53, so they are exact as Lua numbers and in the integer reply; they are
-- written with %.0f, since Lua's tostring would print 1.8e15 as "1.8e+15".

-- Grant the next token of `fence` for a lease of `lease_ms`; the key then lives between
-- idle_ms / 2 and idle_ms past that lease (keep_for). Returns the token (a number).
local function fence_next(fence, lease_ms, idle_ms)
  local token = now_us()
  local last = tonumber(redis.call('SET', fence, string.format('%.0f', token), 'KEEPTTL',
                                    'GET'))
  if last and last >= token then
    -- The clock is not past the last token (it went back; two grants in one microsecond):
    -- count on from the last token, and keep it the whole idle time, since now it alone
    -- keeps tokens rising.
    token = last + 1
    redis.call('SET', fence, string.format('%.0f', token), 'PX', lease_ms + idle_ms)
  else
    keep_for(fence, lease_ms, idle_ms)
  end
  return token
end
