-- Delete a task's claims record if it is still the one this run of the task wrote.
-- KEYS[1] the record: <prefix>:claims:<task id>
-- ARGV[1] the text this run wrote (its claims and holder line: unique to the run)
-- A record rewritten since (by a re-sent message of the same task id, or another delivery of
-- it) belongs to that run and is left alone.
-- Returns 1 when deleted, 0 when the record was gone or rewritten.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
