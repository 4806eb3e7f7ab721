-- Store a task's result as Celery's Redis backend does (SET with its lifetime, then PUBLISH
-- on the key's channel), but only once the run holds nothing any more: the last command of
-- the transaction that sends a worker run's releases (integration/with_result.py). A release
-- the server could not run there (NOSCRIPT: its scripts were lost to a restart, a failover or
-- SCRIPT FLUSH) leaves its key as it was, and the result is then not stored: no caller sees
-- the result before the releases. The worker sends them again on their own, then stores.
-- It also makes Celery's check before a store (a GET in a round trip of its own: a result
-- stored as SUCCESS is never overwritten, say by a redelivered copy of a task that ran)
-- here, in the same step as the store.
-- Likewise for a write sent before the store (a cache entry of the run's result): the result
-- is stored only once its key is there.
-- KEYS[1]    the result key (celery-task-meta-<task id>)
-- KEYS[2..]  one key per check: a lease's key (a lock, or a semaphore's holders zset), the
--            run's claims record, or a key written before the store (a cache entry)
-- ARGV[1]    the result, as Celery encoded it
-- ARGV[2]    its lifetime, ms ("0": none)
-- ARGV[3..]  per check, two values: its kind ("m": the key holds the value, as a lock holds
--            its owner and a record the text its run wrote; "s": the zset has the value as a
--            member, as a semaphore's holders have a permit's owner; "e": the key must exist,
--            the value unused), and the value
-- Returns 1 when stored; 0 when a check found the run still holding or a write missing
--         (nothing written); 2 when a result with the status SUCCESS is there already (kept:
--         nothing written); 3 when a result is there that this script cannot read (not a JSON
--         object: another serializer, or compressed): nothing written, the caller reads it as
--         Celery would.
for i = 2, #KEYS do
  local kind, value = ARGV[2 * i - 1], ARGV[2 * i]
  if kind == 'm' then
    if redis.call('GET', KEYS[i]) == value then return 0 end
  elseif kind == 'e' then
    if redis.call('EXISTS', KEYS[i]) == 0 then return 0 end
  elseif redis.call('ZSCORE', KEYS[i], value) then
    return 0
  end
end
local current = redis.call('GET', KEYS[1])
if current then
  if string.sub(current, 1, 1) ~= '{' then return 3 end
  local ok, meta = pcall(cjson.decode, current)
  if not ok or type(meta) ~= 'table' then return 3 end
  if meta['status'] == 'SUCCESS' then return 2 end
end
local ms = tonumber(ARGV[2])
if ms > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ms)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
