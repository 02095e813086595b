-- Makes a reservation last until the binding's expiry (also extends or shortens it). pool_lib.lua is prepended.
-- ARGV[4] number, [5] reservation id, [6] binding id, [7] expire ms.
-- Returns {'ok', live} | {'missing'} | {'past'} | {'other_binding', binding_id}.
local n = ARGV[4]
local rid = ARGV[5]
local binding = ARGV[6]
local expire = tonumber(ARGV[7])
prune(n, false)
local h = hkey(n)
local record = redis.call('HGET', h, 'r:' .. rid)
if not record then return { 'missing' } end
if expire <= NOW then return { 'past' } end
local f = split(record)
if f[5] ~= '' and f[5] ~= binding then return { 'other_binding', f[5] } end
-- A repeat (same binding, same expiry: a re-sent call, or a caller's retry) changes nothing and adds no history.
if f[5] == binding and tonumber(redis.call('ZSCORE', rkey(n), rid)) == expire then
  return { 'ok', redis.call('ZCARD', rkey(n)) }
end
f[5] = binding
redis.call('HSET', h, 'r:' .. rid, join(f))
redis.call('ZADD', rkey(n), 'XX', expire, rid)
-- LT: the index may run early (a later sweep fixes it) but never late.
redis.call('ZADD', DUE, 'LT', expire, n)
history(n, 'confirm', { 'binding', binding, 'detail', describe(f) .. ' until_ms=' .. string.format('%d', expire), 'rid', rid })
return { 'ok', redis.call('ZCARD', rkey(n)) }
