-- Stores a new endpoint unless the tenant already has the most it may have (CreateEndpoint).
-- KEYS[1]  the tenant's endpoints hash (np:ev:{ev:t:<tenant>}:eps)
-- ARGV[1]  endpoint id, ARGV[2] the stored endpoint (bytes), ARGV[3] endpoints per tenant at most
-- Returns 1 stored (also when this very call ran before: a client that re-sends a script whose reply was lost),
-- 0 the tenant is at its limit, -1 the id is taken by another endpoint (the caller draws a new one).
local existing = redis.call('HGET', KEYS[1], ARGV[1])
if existing then
  if existing == ARGV[2] then
    return 1
  end
  return -1
end
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
