-- Swaps one party of a reservation atomically (rider reassigned). pool_lib.lua is prepended.
-- ARGV[4] number, [5] reservation id, [6] old party, [7] new party.
-- Returns {'ok'} | {'missing'} | {'not_party'} | {'conflict'}. {'ok'} also when the swap is done already (old is no
-- party, new is one): a repeat of the call, whose reply was lost, or a caller's retry.
local n = ARGV[4]
local rid = ARGV[5]
local old = ARGV[6]
local new = ARGV[7]
prune(n, false)
local h = hkey(n)
local record = redis.call('HGET', h, 'r:' .. rid)
if not record then return { 'missing' } end
local f = split(record)
local at = nil
if f[2] == old then at = 2 elseif f[3] == old then at = 3 end
if not at then
  if f[2] == new or f[3] == new then return { 'ok' } end
  return { 'not_party' }
end
if f[2] == new or f[3] == new then return { 'conflict' } end
if f[1] ~= 'AXE' then
  -- (number, party) identifies one binding: the new party must not hold one on this number already.
  if redis.call('HEXISTS', h, 'p:' .. new) == 1 then return { 'conflict' } end
  redis.call('HDEL', h, 'p:' .. old)
  redis.call('HSET', h, 'p:' .. new, rid)
end
local before = describe(f)
f[at] = new
redis.call('HSET', h, 'r:' .. rid, join(f))
history(n, 'replace', { 'binding', f[5], 'detail', before .. ' -> ' .. describe(f), 'rid', rid })
return { 'ok' }
