-- Release a lease, then store a task's result: one script (Celery layer, one server), the
-- last release of a worker run whose result store carries its releases
-- (integration/with_result.py). The result and the release are visible together, and a
-- server that lost this script (NOSCRIPT) runs neither.
-- wraps: a release script (mutex_release.lua, sem_release.lua, or a claims_* prefix of one):
-- the loader (scripts.wrapped_script) puts its code in the function released() below, with the
-- same keys and arguments; its reply is the first of this script's.
-- needs: _result_store
-- KEYS[1..n]   the release script's keys (n = ARGV[#ARGV - 1])
-- KEYS[n+1]    the result key; KEYS[n+2..] one key per check, as result_store.lua (for what
--              the release does not end itself: other releases, a cache entry)
-- ARGV[1..m]   the release script's arguments (m = ARGV[#ARGV])
-- ARGV[m+1]    the result, as Celery encoded it; ARGV[m+2] its lifetime, ms ("0": none)
-- ARGV[m+3..]  per check, its kind and value (as result_store.lua)
-- ARGV[#ARGV - 1], ARGV[#ARGV]: n and m
-- Returns: {the release script's reply, what store_result returns (_result_store.lua)}.
-- the wrapped script here
local reply = released()
return {reply, store_result(tonumber(ARGV[#ARGV - 1]) + 1, tonumber(ARGV[#ARGV]) + 1)}
