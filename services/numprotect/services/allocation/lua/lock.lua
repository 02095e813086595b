-- Takes a number out of service: never handed out while locked. pool_lib.lua is prepended.
-- Live reservations stay (they lapse or are cancelled as usual); translation rejects calls via np:lock:{X}.
-- ARGV[4] number, [5] reason, [6] actor. Returns {'ok', info...} | {'unknown'}.
-- KEYS[2] (optional) the outbox of the sub-pool's slot (numprotect.core.event_keys.outbox_key_beside): a lock that
-- changes something (the number was not locked, or for another reason) records number.locked there, fields ty, tn
-- (the pool's tenant), at (now), src (the number), n "", d "<reason>|<actor>".
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
  if KEYS[2] then
    redis.call('XADD', KEYS[2], '*', 'ty', 'number.locked', 'tn', TENANT, 'at', string.format('%d', NOW), 'src', n,
      'n', '', 'd', reason .. '|' .. actor)
  end
end
return reply_info('ok', n)
