-- Move a message just published to a kombu Redis queue to the front of that queue, so that
-- it is the next one consumed. kombu publishes with LPUSH and consumes with BRPOP: the front
-- is the right end. Used for re-sent parked messages: they were sent before anything still
-- queued, and a lock or permit is reserved for them while they travel.
-- KEYS[1] the queue's list (kombu's key for the message's queue and priority)
-- ARGV[1] a marker only that message holds (its dispatch id), ARGV[2] how many of the
--         newest messages (the left end) to look through
-- Returns 1 when moved, 0 when not found there (already consumed, or pushed out of reach by
-- later publishes: it then stays where it is, which is only later, never lost).
local newest = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)
for _, message in ipairs(newest) do
  if string.find(message, ARGV[1], 1, true) then
    redis.call('LREM', KEYS[1], 1, message)
    redis.call('RPUSH', KEYS[1], message)
    return 1
  end
end
return 0
