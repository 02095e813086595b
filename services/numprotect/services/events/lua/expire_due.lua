-- Records the expiry of the slot's bindings that have expired: for each binding of the slot's expiry zset due by
-- Redis's clock, whose record is committed (st=a), not deleted (dms 0) and has expire_ms <= now, appends a
-- binding.expired entry to the slot's outbox and takes the binding off the zset (once: a binding off the zset is
-- not looked at again). A binding extended since (its record's ems in the future) stays, at its new expiry; one
-- deleted, pending or gone leaves the zset without an event.
-- KEYS[1]  the slot's expiry zset (binding id -> expire ms)
-- KEYS[2]  the slot's outbox
-- ARGV[1]  the binding record key's prefix ("np:b:{"), ARGV[2] its suffix ("}")
-- ARGV[3]  most bindings looked at
-- Returns {bindings expired now, the zset's earliest expiry after this (or -1 when empty)}.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
local expired = 0
for _, binding_id in ipairs(due) do
  local record = ARGV[1] .. binding_id .. ARGV[2]
  local values = redis.call('HMGET', record, 'st', 'dms', 'ems', 't')
  local status, deleted, expire_ms, tenant = values[1], values[2], tonumber(values[3]), values[4]
  if status ~= 'a' or (deleted and deleted ~= '0') or not expire_ms or not tenant then
    redis.call('ZREM', KEYS[1], binding_id)
  elseif expire_ms > now then
    redis.call('ZADD', KEYS[1], values[3], binding_id)
  else
    redis.call(
      'XADD', KEYS[2], '*', 'ty', 'binding.expired', 'tn', tenant, 'at', values[3], 'src', binding_id, 'n', '',
      'd', values[3]
    )
    redis.call('ZREM', KEYS[1], binding_id)
    expired = expired + 1
  end
end
local earliest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #earliest == 0 then
  return {expired, -1}
end
return {expired, tonumber(earliest[2])}
