-- Shared prelude of every pool script (prepended by allocation.scripts; not a script by itself).
--
-- KEYS[1] is the base key of one sub-pool of a pool (numprotect.core.pool_keys: np:alloc:{pool:<tenant>:<city>} for
-- sub-pool 0, np:alloc:{pool:<tenant>:<city>:s<k>.<salt>} for the others), a hash: tenant, city, total (numbers of
-- this sub-pool), subpool (k), subpools (N). Every other key below is derived from it and shares its hash tag, so
-- each script touches exactly one cluster slot; a number and its reservations and history live in one sub-pool.
-- ARGV[1] = tenant, ARGV[2] = city, ARGV[3] = history retention (ms); script-specific arguments follow.
--
--   <P>:avail        set   numbers that are free (no live reservation, not locked, not cooling)
--   <P>:axb|axe|axn  zset  numbers serving that mode -> live reservation count (locked numbers excluded)
--   <P>:mode         hash  number -> AXB|AXN|AXE while it has live reservations
--   <P>:locked       hash  number -> lock reason
--   <P>:lockcool     hash  number -> cooling deadline (ms) it had when it was locked
--   <P>:cooling      zset  number -> end of cool-down (ms)
--   <P>:due          zset  number -> earliest expiry (ms) of its reservations (never later than the truth)
--   <P>:blocks       set   imported 11-digit blocks
--   <P>:r:<n>        zset  reservation id -> expiry (ms); live count = ZCARD after pruning
--   <P>:h:<n>        hash  p:<party> -> rid (AXB/AXN), x:<ext> -> rid (AXE), r:<rid> -> mode|a|b|ext|binding
--   <P>:hist:<n>     stream the number's history (assign, confirm, unassign, replace, lock, unlock, release),
--                    trimmed past the retention
--   <P>:a:<rid>      string allocate.lua's answer "number|ext|expire_ms" for reservation <rid>, until its lease ends
--                    (a repeat of the same allocate gets the same number)
--   <P>:expired      string bindings whose confirmed reservation lapsed here (the binding's end) and that no allocation
--                    process has counted yet: prune adds 1 each, the pool metrics take it with GETDEL
--   <P>:taken:<day>  string the net take of allocations from the free set on UTC day <day> (days since the epoch):
--                    +1 per number an allocation took from it, -1 per number that went back to it when its last
--                    reservation ended; expires 8 days after the day's first change (GetPoolStats reads 7 days)

local P = KEYS[1]
local TENANT = ARGV[1]
local CITY = ARGV[2]
local RETENTION = tonumber(ARGV[3])
local clock = redis.call('TIME')
local NOW = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local AVAIL = P .. ':avail'
local MODE = P .. ':mode'
local LOCKED = P .. ':locked'
local LOCKCOOL = P .. ':lockcool'
local COOLING = P .. ':cooling'
local DUE = P .. ':due'
local BLOCKS = P .. ':blocks'
local MODE_SETS = { AXB = P .. ':axb', AXE = P .. ':axe', AXN = P .. ':axn' }

local DAY_MS = 86400000
local TODAY = math.floor(NOW / DAY_MS)
local TAKEN_TTL_SECONDS = 8 * 86400

local function taken_key(day) return P .. ':taken:' .. string.format('%d', day) end

-- Counts allocation's net take from the free set for today (pool_stats.lua sums the last 7 days).
local function count_taken(delta)
  local key = taken_key(TODAY)
  redis.call('INCRBY', key, delta)
  redis.call('EXPIRE', key, TAKEN_TTL_SECONDS, 'NX')
end

local function rkey(n) return P .. ':r:' .. n end
local function hkey(n) return P .. ':h:' .. n end
local function histkey(n) return P .. ':hist:' .. n end

local function mask(p)
  local len = string.len(p)
  if len >= 11 then return string.sub(p, 1, 3) .. string.rep('*', len - 7) .. string.sub(p, -4) end
  if len > 4 then return string.rep('*', len - 2) .. string.sub(p, -2) end
  return string.rep('*', len)
end

-- A reservation record: mode|a|b|ext|binding_id
local function split(record)
  local out = {}
  for part in string.gmatch(record .. '|', '([^|]*)|') do out[#out + 1] = part end
  return out
end

local function join(f) return f[1] .. '|' .. f[2] .. '|' .. f[3] .. '|' .. f[4] .. '|' .. f[5] end

local function describe(f)
  local text = 'mode=' .. f[1] .. ' a=' .. mask(f[2])
  if f[3] ~= '' then text = text .. ' b=' .. mask(f[3]) end
  if f[4] ~= '' then text = text .. ' ext=' .. f[4] end
  return text
end

-- Entries older than the retention are trimmed as new ones arrive (MINID ~: whole macro nodes, cheap).
local function history(n, kind, fields)
  redis.call('XADD', histkey(n), 'MINID', '~', string.format('%d', math.max(0, NOW - RETENTION)), '*', 'kind', kind, 'tenant', TENANT,
    unpack(fields))
end

local function known(n)
  return redis.call('SISMEMBER', BLOCKS, string.sub(n, 1, 11)) == 1
end

-- Removes the index entries of one reservation (not its zset member); returns its fields.
local function drop_record(n, rid, record)
  local f = split(record)
  local h = hkey(n)
  for i = 2, 3 do
    if f[i] ~= '' and redis.call('HGET', h, 'p:' .. f[i]) == rid then redis.call('HDEL', h, 'p:' .. f[i]) end
  end
  if f[4] ~= '' then redis.call('HDEL', h, 'x:' .. f[4]) end
  redis.call('HDEL', h, 'r:' .. rid)
  return f
end

-- Puts the number in the right index for its live count (after any change to its reservations).
local function settle(n, live)
  local mode = redis.call('HGET', MODE, n)
  local locked = redis.call('HEXISTS', LOCKED, n) == 1
  if live == 0 then
    if mode then
      redis.call('ZREM', MODE_SETS[mode], n)
      redis.call('HDEL', MODE, n)
    end
    redis.call('ZREM', DUE, n)
    if not locked and not redis.call('ZSCORE', COOLING, n) then
      -- Back to the free set from use (it had a mode): the allocation rate's return.
      if redis.call('SADD', AVAIL, n) == 1 and mode then count_taken(-1) end
    end
  else
    if mode and not locked then redis.call('ZADD', MODE_SETS[mode], live, n) end
    local first = redis.call('ZRANGE', rkey(n), 0, 0, 'WITHSCORES')
    redis.call('ZADD', DUE, first[2], n)
  end
end

-- Drops the number's lapsed reservations (expiry <= server time) and returns its live count.
local function prune(n, always_settle)
  local rk = rkey(n)
  local dead = redis.call('ZRANGEBYSCORE', rk, '-inf', NOW, 'WITHSCORES')
  if #dead == 0 then
    local live = redis.call('ZCARD', rk)
    if always_settle then settle(n, live) end
    return live
  end
  local h = hkey(n)
  for i = 1, #dead, 2 do
    local rid = dead[i]
    local record = redis.call('HGET', h, 'r:' .. rid)
    if record then
      local f = drop_record(n, rid, record)
      history(n, 'unassign', { 'reason', 'expired', 'binding', f[5], 'at', dead[i + 1], 'detail', describe(f) })
      -- A confirmed reservation (it names its binding) lapses when its binding ends: numprotect_bindings_expired.
      if f[5] ~= '' then redis.call('INCR', P .. ':expired') end
    end
  end
  redis.call('ZREMRANGEBYSCORE', rk, '-inf', NOW)
  local live = redis.call('ZCARD', rk)
  settle(n, live)
  return live
end

-- Bounded lazy maintenance: numbers whose reservations lapsed, and cool-downs that ended.
local function sweep(limit)
  local due = redis.call('ZRANGEBYSCORE', DUE, '-inf', NOW, 'LIMIT', 0, limit)
  for _, n in ipairs(due) do prune(n, true) end
  local cooled = redis.call('ZRANGEBYSCORE', COOLING, '-inf', NOW, 'LIMIT', 0, limit)
  for _, n in ipairs(cooled) do
    redis.call('ZREM', COOLING, n)
    if redis.call('HEXISTS', LOCKED, n) == 0 then redis.call('SADD', AVAIL, n) end
  end
  return #due + #cooled
end

-- {state, live, mode, lock_reason, cooling_until_ms} after pruning.
local function info(n)
  local live = prune(n, false)
  local mode = redis.call('HGET', MODE, n) or ''
  local reason = redis.call('HGET', LOCKED, n)
  if reason then return { 'LOCKED', live, mode, reason, 0 } end
  local cool = redis.call('ZSCORE', COOLING, n)
  if cool then
    if tonumber(cool) > NOW then return { 'COOLING', live, mode, '', tonumber(cool) } end
    redis.call('ZREM', COOLING, n)
    redis.call('SADD', AVAIL, n)
  end
  if live > 0 then return { 'IN_USE', live, mode, '', 0 } end
  return { 'AVAILABLE', 0, '', '', 0 }
end

local function reply_info(status, n)
  local i = info(n)
  return { status, i[1], i[2], i[3], i[4], i[5] }
end

-- ---- end of prelude ----
