-- Indexes a binding on its virtual number's history and trims entries past retention.
-- KEYS[1]  np:nh:{X} (member binding_id, score = the binding's latest end in ms)
-- ARGV[1]  binding_id
-- ARGV[2]  end_ms: the score is only ever raised (an extension), never lowered (a stale higher score is
--          harmless: readers check the record)
-- ARGV[3]  retention_ms: entries that ended more than this long ago are removed
-- The key expires at the newest end + retention (only ever pushed later).
local end_ms = tonumber(ARGV[2])
local retention = tonumber(ARGV[3])
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now_ms - retention))
-- ZADD GT adds new members and raises, never lowers, the score of existing ones.
redis.call('ZADD', KEYS[1], 'GT', end_ms, ARGV[1])
local expire_at = end_ms + retention
local current = redis.call('PEXPIRETIME', KEYS[1])
if current == -1 or current < expire_at then
  redis.call('PEXPIREAT', KEYS[1], expire_at)
end
return 1
