-- Counts per state, after sweeping lapsed reservations and ended cool-downs. pool_lib.lua is prepended.
-- ARGV[4] sweep budget (numbers). Returns {total, available, in_use, locked, cooling, settled (1|0), net taken over
-- today and the 6 days before (pool_lib.lua's <P>:taken:<day>), server time (ms)}.
local budget = tonumber(ARGV[4])
local settled = 0
while budget > 0 do
  local done = sweep(math.min(budget, 512))
  budget = budget - 512
  if done == 0 then
    settled = 1
    break
  end
end
local taken = 0
for day = TODAY - 6, TODAY do
  taken = taken + tonumber(redis.call('GET', taken_key(day)) or '0')
end
local in_use = redis.call('ZCARD', MODE_SETS.AXB) + redis.call('ZCARD', MODE_SETS.AXE) + redis.call('ZCARD', MODE_SETS.AXN)
return {
  tonumber(redis.call('HGET', P, 'total') or '0'),
  redis.call('SCARD', AVAIL),
  in_use,
  redis.call('HLEN', LOCKED),
  redis.call('ZCARD', COOLING),
  settled,
  taken,
  NOW,
}
