-- Puts a locked number back where it belongs (cooling, in use or free). pool_lib.lua is prepended.
-- ARGV[4] number, [5] actor. Returns {'ok', info...} | {'unknown'}. Idempotent: unlocking a free number is a no-op.
local n = ARGV[4]
local actor = ARGV[5]
if not known(n) then return { 'unknown' } end
local live = prune(n, false)
if redis.call('HEXISTS', LOCKED, n) == 1 then
  redis.call('HDEL', LOCKED, n)
  local cool = redis.call('HGET', LOCKCOOL, n)
  redis.call('HDEL', LOCKCOOL, n)
  if cool and tonumber(cool) > NOW then
    redis.call('ZADD', COOLING, cool, n)
  elseif live > 0 then
    redis.call('ZADD', MODE_SETS[redis.call('HGET', MODE, n)], live, n)
  else
    redis.call('SADD', AVAIL, n)
  end
  history(n, 'unlock', { 'actor', actor })
end
return reply_info('ok', n)
