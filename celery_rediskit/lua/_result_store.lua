-- Shared library: store a task's result as Celery's Redis backend does (SET with its
-- lifetime, then PUBLISH on the key's channel), after checks (result_store.lua,
-- store_after.lua; integration/with_result.py).
--
-- store_result(k, a): KEYS[k] is the result key (celery-task-meta-<task id>) and KEYS[k+1..]
-- one key per check; ARGV[a] is the result as Celery encoded it, ARGV[a+1] its lifetime in ms
-- ("0": none), then per check two values: its kind and its value. Kinds: "m" the key must not
-- hold the value (as a lock holds its owner and a claims record the text its run wrote), "s"
-- the zset must not have the value as a member (a semaphore's holders and a permit's owner),
-- "e" the key must exist (a cache entry written before the store; the value unused).
-- Celery's own check before a store is made here too: a result stored as SUCCESS is kept
-- (its lifetime is then the new result's: it is put back after the SET that read it).
-- Returns 1 when stored; 0 when a check failed (nothing written); 2 when a result with the
-- status SUCCESS is there already (kept: nothing written); 3 when a result is there that this
-- code cannot read (not a JSON object: another serializer, or compressed): nothing written,
-- the caller reads it as Celery would.
local function store_result(k, a)
  for i = k + 1, #KEYS do
    local at = a + 2 * (i - k)
    local kind, value = ARGV[at], ARGV[at + 1]
    if kind == 'm' then
      if redis.call('GET', KEYS[i]) == value then return 0 end
    elseif kind == 'e' then
      if redis.call('EXISTS', KEYS[i]) == 0 then return 0 end
    elseif redis.call('ZSCORE', KEYS[i], value) then
      return 0
    end
  end
  -- Stored, reading what was there in the same call: usually nothing (a task's first store)
  -- or a state stored before the result (STARTED, RETRY). A SUCCESS there, or a value this
  -- code cannot read, is put back (with the result's lifetime), unseen: the script is atomic.
  local ms = tonumber(ARGV[a + 1])
  local current
  if ms > 0 then
    current = redis.call('SET', KEYS[k], ARGV[a], 'PX', ms, 'GET')
  else
    current = redis.call('SET', KEYS[k], ARGV[a], 'GET')
  end
  if current then
    local kept = 0
    if string.sub(current, 1, 1) ~= '{' then
      kept = 3
    else
      local ok, meta = pcall(cjson.decode, current)
      if not ok or type(meta) ~= 'table' then
        kept = 3
      elseif meta['status'] == 'SUCCESS' then
        kept = 2
      end
    end
    if kept ~= 0 then
      if ms > 0 then
        redis.call('SET', KEYS[k], current, 'PX', ms)
      else
        redis.call('SET', KEYS[k], current)
      end
      return kept
    end
  end
  redis.call('PUBLISH', KEYS[k], ARGV[a])
  return 1
end
