-- Puts a locked number back where it belongs (cooling, in use or free). pool_lib.lua is prepended.
-- ARGV[4] number, [5] actor. Returns {'ok', info...} | {'unknown'}. Idempotent: unlocking a free number is a no-op.
-- KEYS[2] (optional) the outbox of the sub-pool's slot (numprotect.core.event_keys.outbox_key_beside): unlocking a
-- locked number records number.unlocked there, fields ty, tn (the pool's tenant), at (now), src (the number), n "",
-- d "<reason it was locked for>|<actor>".
local n = ARGV[4]
local actor = ARGV[5]
if not known(n) then return { 'unknown' } end
local live = prune(n, false)
local reason = redis.call('HGET', LOCKED, n)
if reason then
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
  if KEYS[2] then
    redis.call('XADD', KEYS[2], '*', 'ty', 'number.unlocked', 'tn', TENANT, 'at', string.format('%d', NOW), 'src', n,
      'n', '', 'd', reason .. '|' .. actor)
  end
end
return reply_info('ok', n)
