-- Takes a number out of service: never handed out while locked. pool_lib.lua is prepended.
-- Live reservations stay (they lapse or are cancelled as usual); translation rejects calls via np:lock:{X}.
-- ARGV[4] number, [5] reason, [6] actor. Returns {'ok', info...} | {'unknown'}.
local n = ARGV[4]
local reason = ARGV[5]
local actor = ARGV[6]
if not known(n) then return { 'unknown' } end
prune(n, false)
if redis.call('HEXISTS', LOCKED, n) == 0 then
  redis.call('SREM', AVAIL, n)
  local mode = redis.call('HGET', MODE, n)
  if mode then redis.call('ZREM', MODE_SETS[mode], n) end
  local cool = redis.call('ZSCORE', COOLING, n)
  if cool then
    redis.call('ZREM', COOLING, n)
    redis.call('HSET', LOCKCOOL, n, cool)
  end
end
-- Locked already for this reason (a repeat of the call, or a retry): nothing changes, no second history entry.
if redis.call('HGET', LOCKED, n) ~= reason then
  redis.call('HSET', LOCKED, n, reason)
  history(n, 'lock', { 'actor', actor, 'reason', reason })
end
return reply_info('ok', n)
