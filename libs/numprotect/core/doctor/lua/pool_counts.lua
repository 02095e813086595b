#!lua flags=no-writes
-- The counters and set sizes of one sub-pool of a pool, read atomically (the allocation scripts change several at
-- once). KEYS[1] the sub-pool's base key (numprotect.core.pool_keys; allocation's lua/pool_lib.lua names the others).
-- Returns {total, blocks, avail, axb, axe, axn, locked, cooling, subpool, subpools}; subpool and subpools are -1
-- when the record has none (a pool made before sub-pools: sub-pool 0 of 1).
local P = KEYS[1]
local place = redis.call('HMGET', P, 'subpool', 'subpools')
return {
  tonumber(redis.call('HGET', P, 'total') or '0'),
  redis.call('SCARD', P .. ':blocks'),
  redis.call('SCARD', P .. ':avail'),
  redis.call('ZCARD', P .. ':axb'),
  redis.call('ZCARD', P .. ':axe'),
  redis.call('ZCARD', P .. ':axn'),
  redis.call('HLEN', P .. ':locked'),
  redis.call('ZCARD', P .. ':cooling'),
  tonumber(place[1] or '-1'),
  tonumber(place[2] or '-1'),
}
