-- Marks a claimed order done: the commit point of a create. Only the create that holds the claim may.
-- KEYS[1]  the order key
-- ARGV[1]  the pending value this create wrote
-- ARGV[2]  the done value
-- ARGV[3]  expire_at_ms of the key (binding end + retention)
-- Returns 1 (also to a repeat of this call: the key holds the done value already), or 0 (nothing written) when
-- the claim is no longer this create's.
local current = redis.call('GET', KEYS[1])
if current == ARGV[2] then
  return 1
end
if current ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PXAT', ARGV[3])
return 1
