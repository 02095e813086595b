-- Frees a reservation at once; idempotent. pool_lib.lua is prepended.
-- ARGV[4] number, [5] reservation id, [6] reason. Returns {'ok', live} or {'missing'}.
local n = ARGV[4]
local rid = ARGV[5]
local reason = ARGV[6]
prune(n, false)
local record = redis.call('HGET', hkey(n), 'r:' .. rid)
if not record then return { 'missing' } end
local f = drop_record(n, rid, record)
redis.call('ZREM', rkey(n), rid)
local live = redis.call('ZCARD', rkey(n))
settle(n, live)
history(n, 'unassign', { 'reason', reason, 'binding', f[5], 'detail', describe(f), 'rid', rid })
return { 'ok', live }
