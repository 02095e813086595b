#!lua flags=no-writes
-- The counters and set sizes of one pool, read atomically (the allocation scripts change several at once).
-- KEYS[1] the pool's base key np:alloc:{pool:<tenant>:<city>} (allocation's lua/pool_lib.lua names the others).
-- Returns {total, blocks, avail, axb, axe, axn, locked, cooling}.
local P = KEYS[1]
return {
  tonumber(redis.call('HGET', P, 'total') or '0'),
  redis.call('SCARD', P .. ':blocks'),
  redis.call('SCARD', P .. ':avail'),
  redis.call('ZCARD', P .. ':axb'),
  redis.call('ZCARD', P .. ':axe'),
  redis.call('ZCARD', P .. ':axn'),
  redis.call('HLEN', P .. ':locked'),
  redis.call('ZCARD', P .. ':cooling'),
}
