-- An owner's (tenant's or the unmatched records') bucket count, fixed by its first write: the stored count if
-- there is one; else 1 when bucket 0's stream exists (records stored before buckets existed stay where they are,
-- no migration), else the count for a new owner. Runs before the owner's first ingest in a process.
-- KEYS[1] the owner's count key, KEYS[2] bucket 0's stream (same slot); ARGV[1] the count for a new owner.
-- Returns the count. A repeat finds the count the first run set.
local count = redis.call('GET', KEYS[1])
if count then
  return tonumber(count)
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  count = 1
else
  count = tonumber(ARGV[1])
end
redis.call('SET', KEYS[1], count)
return count
