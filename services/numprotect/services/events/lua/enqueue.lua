-- Queues log entries for one endpoint of a tenant, due now (ReplayEvents; the same step route.lua and
-- RedriveDeadLetters take): an entry queued already keeps its due time; its attempts start again from 0.
-- KEYS[1]  the endpoint's queue (zset: log entry id -> due ms)
-- KEYS[2]  the endpoint's attempts (hash: log entry id -> attempts made)
-- KEYS[3]  the tenant's ready zset
-- KEYS[4]  the tenant's endpoints (hash): a deleted endpoint gets nothing
-- ARGV[1]  the endpoint id; ARGV[2..] log entry ids
-- Returns how many entries were queued.
if redis.call('HEXISTS', KEYS[4], ARGV[1]) == 0 then
  return 0
end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'NX', now, ARGV[i])
  redis.call('HSET', KEYS[2], ARGV[i], 0)
end
if #ARGV >= 2 then
  redis.call('ZADD', KEYS[3], 'LT', now, ARGV[1])
end
return #ARGV - 1
