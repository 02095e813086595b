-- Adds the 10,000 numbers of one block to the pool; idempotent. pool_lib.lua is prepended.
-- ARGV[4] 11-digit block. Returns the count added (10000, or 0 when the block was already in the pool).
local block = ARGV[4]
if redis.call('SISMEMBER', BLOCKS, block) == 1 then return 0 end
redis.call('HSET', P, 'tenant', TENANT, 'city', CITY)
local chunk = {}
for i = 0, 9999 do
  chunk[#chunk + 1] = block .. string.format('%04d', i)
  if #chunk == 1000 then
    redis.call('SADD', AVAIL, unpack(chunk))
    chunk = {}
  end
end
redis.call('SADD', BLOCKS, block)
redis.call('HINCRBY', P, 'total', 10000)
return 10000
