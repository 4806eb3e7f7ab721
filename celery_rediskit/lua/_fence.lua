-- Shared library: fencing tokens.
-- early: the mutex's fast path grants, so it needs this above its fast path.
-- needs: _clock
--
-- A lock's fence key holds the last token granted for it. The next token is
--   max(last + 1, the server's clock in microseconds)
-- so tokens rise with every grant while the fence key exists, and keep rising when it is gone
-- (restart without persistence, FLUSHDB, eviction, idle expiry, a failover to a replica that
-- missed the last grants) as long as the server's clock is past the earlier grants'.
-- Tokens stay below 2^53, so they are exact as Lua numbers and in the integer reply; they are
-- written with %.0f, since Lua's tostring would print 1.8e15 as "1.8e+15".

-- Grant the next token of `fence` for a lease of `lease_ms`. Returns the token (a number).
-- The key lives lease_ms + idle_ms from each grant: its expiry is set by the same SET that
-- writes the token (PX costs nothing there, where a PEXPIRE of its own would be one more call),
-- so an unused key expires idle_ms after the last grant's lease.
local function fence_next(fence, lease_ms, idle_ms)
  local token = now_us()
  local life = lease_ms + idle_ms
  local last = tonumber(redis.call('SET', fence, string.format('%.0f', token), 'PX', life,
                                    'GET'))
  if last and last >= token then
    -- The clock is not past the last token (it went back; two grants in one microsecond):
    -- count on from the last token.
    token = last + 1
    redis.call('SET', fence, string.format('%.0f', token), 'PX', life)
  end
  return token
end
