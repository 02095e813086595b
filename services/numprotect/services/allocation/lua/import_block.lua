-- Adds one block's numbers of this sub-pool (<block><i> for i = index, index + N, ... < 10000); idempotent.
-- pool_lib.lua is prepended. ARGV[4] 11-digit block, [5] sub-pool index, [6] sub-pool count: for sub-pool 0 the
-- count asked for a new pool (the pool's record, sub-pool 0's hash, keeps the count its first import fixed: a pool
-- made before sub-pools has 1), for the others the pool's fixed count.
-- Returns {added, count}: added = the numbers this call put in (0 when the block was in the sub-pool already),
-- count = the pool's sub-pool count.
local block = ARGV[4]
local index = tonumber(ARGV[5])
local count = tonumber(ARGV[6])
if index == 0 then
  local fixed = redis.call('HGET', P, 'subpools')
  if fixed then
    count = tonumber(fixed)
  elseif redis.call('EXISTS', P) == 1 then
    count = 1
  end
end
if redis.call('SISMEMBER', BLOCKS, block) == 1 then return { 0, count } end
redis.call('HSET', P, 'tenant', TENANT, 'city', CITY, 'subpool', index, 'subpools', count)
local chunk = {}
local added = 0
for i = index, 9999, count do
  chunk[#chunk + 1] = block .. string.format('%04d', i)
  if #chunk == 1000 then
    redis.call('SADD', AVAIL, unpack(chunk))
    added = added + #chunk
    chunk = {}
  end
end
if #chunk > 0 then
  redis.call('SADD', AVAIL, unpack(chunk))
  added = added + #chunk
end
redis.call('SADD', BLOCKS, block)
redis.call('HINCRBY', P, 'total', added)
return { added, count }
