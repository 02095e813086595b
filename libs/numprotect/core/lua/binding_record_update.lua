-- Changes fields of an existing binding record and appends one event to its history; records the events tenants
-- are told about (binding.created / .updated / .deleted) in the outbox of the record's slot, in this same step.
-- KEYS[1]  the record hash (np:b:{<binding_id>})
-- KEYS[2], KEYS[3]  (optional, together) the outbox and the binding expiries of the record's slot
--          (numprotect.core.event_keys: outbox_key_beside, expiry_key_beside); without them no event is recorded
-- KEYS[#KEYS] (the last: 2 or 4, with ARGV[3]) a key of the record's slot to delete when it holds ARGV[3]: the lock
--          of the call that writes, released by its last write
-- ARGV[1]  new expire_at_ms of the record (binding end + retention), or 0 to keep it
-- ARGV[2]  event to append ("<kind>|<ms>|k=v,..."), or "" for none
-- ARGV[3]  the value the last key holds while it is to be deleted, or "" (no such key)
-- ARGV[4..] field, value, field, value, ...
-- Outbox entries (fields ty, tn, at, src, n, d): binding.created when `st` goes to "a" (at = the create's ms, n = 1),
-- binding.updated / binding.deleted when an update / delete event is appended (at = the event's ms, n = its index);
-- src = the binding id, d = "". The expiries hold binding id -> ems while the record is committed and not deleted
-- (rewritten whenever st, ems or dms is written). A repeat of a call records nothing again: st is "a" already, its
-- event is the record's last one.
-- Returns 1 when written, 0 when the record does not exist (nothing written, nothing deleted).
local record = KEYS[1]
if redis.call('EXISTS', record) == 0 then
  return 0
end
local events = #KEYS >= 3
local was_committed = events and redis.call('HGET', record, 'st') == 'a'
local expiry_written = false
if #ARGV >= 5 then
  local fields = {}
  for i = 4, #ARGV do
    fields[#fields + 1] = ARGV[i]
  end
  for i = 4, #ARGV, 2 do
    local name = ARGV[i]
    if name == 'st' or name == 'ems' or name == 'dms' then
      expiry_written = true
    end
  end
  redis.call('HSET', record, unpack(fields))
end
-- An event equal to the last one is not appended again: that is a repeat of this call (a cluster client re-sends
-- a script whose reply it lost; an event names its millisecond), whose fields are set already.
local appended = nil
if ARGV[2] ~= '' then
  local last = redis.call('HGET', record, 'n')
  if not last or redis.call('HGET', record, 'h' .. last) ~= ARGV[2] then
    appended = redis.call('HINCRBY', record, 'n', 1)
    redis.call('HSET', record, 'h' .. appended, ARGV[2])
  end
end
if events then
  local now = redis.call('HMGET', record, 'st', 't', 'cms', 'ems', 'dms')
  local committed, tenant, ems = now[1] == 'a', now[2] or '', now[4] or '0'
  local binding_id = string.sub(record, 7, -2) -- np:b:{<id>}
  if committed and not was_committed then
    redis.call('XADD', KEYS[2], '*', 'ty', 'binding.created', 'tn', tenant, 'at', now[3] or '0', 'src', binding_id,
      'n', '1', 'd', '')
  end
  if committed and appended then
    local kind, at = string.match(ARGV[2], '^(%a+)|(%d+)|')
    local kinds = { update = 'binding.updated', delete = 'binding.deleted' }
    if kinds[kind] then
      redis.call('XADD', KEYS[2], '*', 'ty', kinds[kind], 'tn', tenant, 'at', at, 'src', binding_id,
        'n', tostring(appended), 'd', '')
    end
  end
  if expiry_written then
    if committed and (now[5] or '0') == '0' then
      redis.call('ZADD', KEYS[3], ems, binding_id)
    else
      redis.call('ZREM', KEYS[3], binding_id)
    end
  end
end
if tonumber(ARGV[1]) > 0 then
  redis.call('PEXPIREAT', record, ARGV[1])
end
local lock = KEYS[#KEYS]
if ARGV[3] ~= '' and #KEYS % 2 == 0 and redis.call('GET', lock) == ARGV[3] then
  redis.call('DEL', lock)
end
return 1
