#!lua flags=allow-cross-slot-keys,no-writes
-- Reads one key of each of many slots in one call (the sweeps of the router and the expirer): every key named is
-- served by this node (the caller groups slots by node; Redis Cluster lets a script with allow-cross-slot-keys read
-- keys of several slots of its node). The keys come in ARGV, not KEYS: a cluster refuses a call whose declared keys
-- are in several slots. A slot moved meanwhile fails the call; the caller then reads those slots one by one.
-- ARGV[1]  "length" (XLEN of each stream) or "earliest" (the lowest score of each zset)
-- ARGV[2..] the keys
-- Returns {index (0-based, into the keys), value, ...} for the keys that are not empty.
local found = {}
local earliest = ARGV[1] == 'earliest'
for i = 2, #ARGV do
  if earliest then
    local first = redis.call('ZRANGE', ARGV[i], 0, 0, 'WITHSCORES')
    if #first > 0 then
      found[#found + 1] = i - 2
      found[#found + 1] = first[2]
    end
  else
    local length = redis.call('XLEN', ARGV[i])
    if length > 0 then
      found[#found + 1] = i - 2
      found[#found + 1] = length
    end
  end
end
return found
