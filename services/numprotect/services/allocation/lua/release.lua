-- Returns a number from its tenant's use: it cools down before it can serve again. pool_lib.lua is prepended.
-- ARGV[4] number, [5] actor, [6] reason, [7] cool-down ms.
-- Returns {'ok', info...} | {'unknown'} | {'locked'} | {'in_use', live}.
local n = ARGV[4]
local actor = ARGV[5]
local reason = ARGV[6]
local cooldown = tonumber(ARGV[7])
if not known(n) then return { 'unknown' } end
local live = prune(n, false)
if redis.call('HEXISTS', LOCKED, n) == 1 then return { 'locked' } end
if live > 0 then return { 'in_use', live } end
local cool = redis.call('ZSCORE', COOLING, n)
if cool and tonumber(cool) > NOW then return reply_info('ok', n) end
local until_ms = NOW + cooldown
redis.call('SREM', AVAIL, n)
redis.call('ZADD', COOLING, until_ms, n)
history(n, 'release', { 'actor', actor, 'reason', reason, 'detail', 'cooling_until_ms=' .. string.format('%d', until_ms) })
return reply_info('ok', n)
