-- Failover probe: one write of the kind the services do (a counter and a value under one hash tag, so one slot).
-- KEYS[1] = {tag}:count, KEYS[2] = {tag}:last; ARGV[1] = a value to store. Returns the new count.
local n = redis.call('INCR', KEYS[1])
redis.call('SET', KEYS[2], ARGV[1])
return n
