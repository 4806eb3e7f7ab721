-- Delete a task's claims record if still the one its run wrote, then give a permit back: one
-- script (Celery layer, one server), the last release of the run's end.
-- then: sem_release
-- This file is a prefix: the loader appends sem_release.lua (same keys, arguments and
-- result). The script is atomic, so the record goes with the release as if after it.
-- KEYS[1..6] the semaphore's keys and release record (see sem_release.lua)
-- KEYS[7]    the claims record (see claims_forget.lua)
-- ARGV[1..6] as sem_release.lua
-- ARGV[7]    the text the run wrote in the record
-- ARGV[8]    the record's lifetime, s: a record rewritten since by another run of the task
--            id is put back with it (that run's renewals keep it from there)
-- Returns: what sem_release.lua returns.
-- One call in the usual case: read and delete; another run's record is put back.
local claims = redis.call('GETDEL', KEYS[7])
if claims and claims ~= ARGV[7] then redis.call('SET', KEYS[7], claims, 'EX', ARGV[8]) end
