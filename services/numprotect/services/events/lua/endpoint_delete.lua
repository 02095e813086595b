-- Removes an endpoint and every key of its deliveries (DeleteEndpoint).
-- KEYS[1]  the tenant's endpoints hash, KEYS[2] the tenant's ready zset, KEYS[3..] the endpoint's own keys
--          (event_keys.TenantKeys.endpoint_keys: queue, in flight, attempts, dead letters, their errors, delivery
--          attempts, delivery state)
-- ARGV[1]  endpoint id
-- Returns 1 when the endpoint existed, 0 when it did not.
local removed = redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
for i = 3, #KEYS do
  redis.call('DEL', KEYS[i])
end
return removed
