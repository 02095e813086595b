-- Claims an 11-digit block for one tenant and city (a slot of its own: {blk:<block>}).
-- KEYS[1] np:alloc:{blk:<block>}:owner (hash), KEYS[2] np:alloc:{blk:<block>}:hist (stream).
-- ARGV[1] tenant, [2] city, [3] actor, [4] carrier (recorded in the import event; the owner record's
-- carrier field is written once the carrier table accepts it, numprotect.core.identity.directory).
-- Returns {'new'} | {'mine'} | {'other_tenant', tenant} | {'other_city', city}.
local owner = redis.call('HMGET', KEYS[1], 'tenant', 'city')
if owner[1] then
  if owner[1] ~= ARGV[1] then return { 'other_tenant', owner[1] } end
  if owner[2] ~= ARGV[2] then return { 'other_city', owner[2] } end
  return { 'mine' }
end
redis.call('HSET', KEYS[1], 'tenant', ARGV[1], 'city', ARGV[2], 'actor', ARGV[3])
redis.call('XADD', KEYS[2], '*', 'kind', 'import', 'tenant', ARGV[1], 'actor', ARGV[3], 'detail', 'city=' .. ARGV[2] .. ' carrier=' .. (ARGV[4] or ''))
return { 'new' }
