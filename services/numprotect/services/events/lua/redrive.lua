-- Puts dead letters of one endpoint back on its queue, due now, with their attempts reset (RedriveDeadLetters: the
-- enqueue step of route.lua and ReplayEvents); a log entry that is no dead letter (any more) is left alone.
-- KEYS[1]  dead letters (zset), KEYS[2] their errors (hash), KEYS[3] queue (zset), KEYS[4] attempts (hash),
-- KEYS[5]  the tenant's ready zset
-- ARGV[1]  the endpoint id; ARGV[2..] log entry ids
-- Returns how many were put back.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local requeued = 0
for i = 2, #ARGV do
  local id = ARGV[i]
  if redis.call('ZREM', KEYS[1], id) == 1 then
    redis.call('HDEL', KEYS[2], id)
    redis.call('ZADD', KEYS[3], 'NX', now, id)
    redis.call('HSET', KEYS[4], id, 0)
    requeued = requeued + 1
  end
end
if requeued > 0 then
  redis.call('ZADD', KEYS[5], 'LT', now, ARGV[1])
end
return requeued
