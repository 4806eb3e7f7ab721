-- Run a script of a worker run's end, then store the run's result: one script (Celery layer,
-- one server), the last command of the transaction that stores the result
-- (integration/with_result.py). The wrapped script is the run's last release (with its claims
-- record's deletion), or with no release its last write (the cache entry of its result).
-- The two are visible together, and a server that lost this script (NOSCRIPT) runs neither.
-- wraps: that script (mutex_release.lua, sem_release.lua, a claims_* prefix of one, or
-- cache_set.lua): the loader (scripts.wrapped_script) puts its code in the function
-- wrapped() below, with the same keys and arguments; its reply is the first of this script's.
-- needs: _result_store
-- KEYS[1..n]   the wrapped script's keys (n = ARGV[#ARGV - 1])
-- KEYS[n+1]    the result key; KEYS[n+2..] one key per check, as result_store.lua (for what
--              the wrapped script does not do itself: other releases, a cache entry)
-- ARGV[1..m]   the wrapped script's arguments (m = ARGV[#ARGV])
-- ARGV[m+1]    the result, as Celery encoded it; ARGV[m+2] its lifetime, ms ("0": none)
-- ARGV[m+3..]  per check, its kind and value (as result_store.lua)
-- ARGV[#ARGV - 1], ARGV[#ARGV]: n and m
-- Returns: {the wrapped script's reply, what store_result returns (_result_store.lua)}.
-- the wrapped script here
local reply = wrapped()
return {reply, store_result(tonumber(ARGV[#ARGV - 1]) + 1, tonumber(ARGV[#ARGV]) + 1)}
