-- Delete a task's claims record if still the one its run wrote, then release a lock: one
-- script (Celery layer, one server), the last release of the run's end.
-- then: mutex_release
-- This file is a prefix: the loader appends mutex_release.lua (same keys, arguments and
-- result). The script is atomic, so the record goes with the release as if after it.
-- KEYS[1..5] the lock's keys and release record (see mutex_release.lua)
-- KEYS[6]    the claims record (see claims_forget.lua)
-- ARGV[1..7] as mutex_release.lua
-- ARGV[8]    the text the run wrote in the record
-- ARGV[9]    the record's lifetime, s: a record rewritten since by another run of the task
--            id is put back with it (that run's renewals keep it from there)
-- Returns: what mutex_release.lua returns.
-- One call in the usual case: read and delete; another run's record is put back.
local claims = redis.call('GETDEL', KEYS[6])
if claims and claims ~= ARGV[8] then redis.call('SET', KEYS[6], claims, 'EX', ARGV[9]) end
