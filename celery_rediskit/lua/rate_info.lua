-- Read a rate limiter's state and the server's clock in one step.
-- needs: _clock
-- KEYS[1] limiter  (see rate_check.lua)
-- Returns {stored value or false, now in us}
return {redis.call('GET', KEYS[1]), now_us()}
