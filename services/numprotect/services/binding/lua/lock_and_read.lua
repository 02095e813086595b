-- Reads a binding's record and takes its mutation lock in one step, for UpdateBinding and DeleteBinding: the two
-- keys share the tag {binding_id}. The tenant is compared first, so another tenant's binding is never locked.
-- KEYS[1]  the record np:b:{<binding_id>}
-- KEYS[2]  its lock np:b:{<binding_id>}:lk
-- ARGV[1]  the tenant the call acts for
-- ARGV[2]  the call's token
-- ARGV[3]  the lease in ms
-- Returns {outcome, field, value, field, value, ...} (the record's fields after the outcome):
--   "missing" (no record, or another tenant's: no fields) | "pending" (a create not committed yet: not locked)
--   | "busy" (another call holds the lock: no fields)
--   | "locked" (the lock is the caller's now; also to a repeat of this call: the key holds the caller's token)
if redis.call('HGET', KEYS[1], 't') ~= ARGV[1] then
  return {'missing'}
end
local reply = redis.call('HGETALL', KEYS[1])
if redis.call('HGET', KEYS[1], 'st') ~= 'a' then
  table.insert(reply, 1, 'pending')
  return reply
end
-- SET NX GET (not GET, then SET): a write command even when the lock is held, so that a Redis refusing writes
-- (MISCONF, OOM, a demoted master) fails the call as it would fail the call's own writes (UNAVAILABLE), rather than
-- reporting "busy" the lock a failed attempt of the same caller could not release meanwhile.
local holder = redis.call('SET', KEYS[2], ARGV[2], 'NX', 'GET', 'PX', ARGV[3])
if holder and holder ~= ARGV[2] then
  return {'busy'}
end
table.insert(reply, 1, 'locked')
return reply
