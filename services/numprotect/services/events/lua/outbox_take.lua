-- Takes a slot's outbox for a while (a short lease, so two routers do not render the same entries) and reads its
-- oldest entries.
-- KEYS[1]  the slot's outbox (stream)
-- KEYS[2]  the slot's route lease
-- ARGV[1]  this router's token; ARGV[2] lease ms; ARGV[3] most entries read
-- Returns the entries (XRANGE reply; empty when the outbox is), or false when another router holds the lease.
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then
  return false
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', ARGV[3])
