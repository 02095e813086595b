-- Sets a slot's score in an expiry ring to its next expiry after expire_due.lua ran, unless a producer lowered it
-- meanwhile (its ZADD LT names an earlier expiry, which must not be moved later).
-- KEYS[1]  the expiry ring (zset: slot -> earliest expiry ms)
-- ARGV[1]  the slot; ARGV[2] its score when it was found due; ARGV[3] its next expiry, or -1 for none
-- Returns 1 when set (or removed), 0 when left as a producer made it.
local current = redis.call('ZSCORE', KEYS[1], ARGV[1])
if current and tonumber(current) < tonumber(ARGV[2]) then
  return 0
end
if tonumber(ARGV[3]) < 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
end
return 1
