-- Replaces a stored endpoint only while it is still the one the caller read (UpdateEndpoint, RotateEndpointSecret,
-- a 410's mark_gone: read, change, swap; a concurrent change makes the caller read again).
-- KEYS[1]  the tenant's endpoints hash, KEYS[2] the tenant's ready zset, KEYS[3] the endpoint's delivery state hash
-- ARGV[1]  endpoint id, ARGV[2] the stored endpoint read, ARGV[3] its replacement
-- ARGV[4]  "1": deliveries resume now (re-enabled, or a new URL): the old receiver's pause and failure count go,
--          and the endpoint is ready (ZADD LT: never later than it was); ARGV[5] the caller's now (ms), taken only
--          up to Redis's own (claim.lua compares ready scores with Redis's clock: a caller whose clock runs ahead
--          must not hold the endpoint back by its skew)
-- Returns 1 swapped (also when this very swap ran before), 0 the endpoint changed since it was read, -1 it is gone.
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then
  return -1
end
if current == ARGV[3] then
  return 1
end
if current ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
if ARGV[4] == '1' then
  redis.call('DEL', KEYS[3])
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', KEYS[2], 'LT', math.min(tonumber(ARGV[5]), now), ARGV[1])
end
return 1
