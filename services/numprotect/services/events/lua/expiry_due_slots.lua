#!lua flags=no-writes
-- The slots of one expiry ring that are due by Redis's clock, the one expire_due.lua expires by (the events
-- process's own clock may lag it, and would hold binding.expired back by that lag).
-- KEYS[1]  the expiry ring (zset: slot -> earliest binding expiry ms)
-- ARGV[1]  most slots read
-- Returns {now ms, slot, score, slot, score, ...}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[1]))
table.insert(due, 1, now)
return due
