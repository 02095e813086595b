-- Picks a number of the pool and reserves it atomically (pool_lib.lua is prepended).
-- ARGV[4] mode AXB|AXN|AXE, [5] party a, [6] party b ('' for AXN without N), [7] lease ms,
-- [8] max live reservations per number, [9] target load (AXB/AXE reuse below it before opening a fresh number),
-- [10] reservation id, [11] random seed (AXE extension probing), [12] candidates, [13] sweep batch.
-- Returns {'ok', number, extension, expire_ms} or {'exhausted'}.
-- Repeat-safe: the answer is kept under <P>:a:<rid> for the lease, and a repeat of the call (same reservation id:
-- a cluster client re-sends a script whose reply it lost) gets it again instead of a second number.
local mode = ARGV[4]
local a = ARGV[5]
local b = ARGV[6]
local lease = tonumber(ARGV[7])
local max = tonumber(ARGV[8])
local target = tonumber(ARGV[9])
local rid = ARGV[10]
local seed = tonumber(ARGV[11])
local candidates = tonumber(ARGV[12])
local answer_key = P .. ':a:' .. rid
local kept = redis.call('GET', answer_key)
if kept then
  local n, ext, expire = string.match(kept, '^([^|]*)|([^|]*)|(%d+)$')
  return { 'ok', n, ext, tonumber(expire) }
end
sweep(tonumber(ARGV[13]))

local expire = NOW + lease
local zset = MODE_SETS[mode]

local function free_extension(h)
  -- 7919 is prime and coprime with 10000: the probes visit distinct extensions, so with at most
  -- max-1 taken a free one is found within max probes.
  for i = 0, max do
    local ext = string.format('%04d', (seed + i * 7919) % 10000)
    if redis.call('HEXISTS', h, 'x:' .. ext) == 0 then return ext end
  end
  return nil
end

local function fits(n)
  if mode ~= 'AXB' then return true end
  local h = hkey(n)
  return redis.call('HEXISTS', h, 'p:' .. a) == 0 and redis.call('HEXISTS', h, 'p:' .. b) == 0
end

local function reserve(n, live)
  local h = hkey(n)
  local ext = ''
  if mode == 'AXE' then
    ext = free_extension(h)
    if not ext then return nil end
    redis.call('HSET', h, 'x:' .. ext, rid)
  else
    redis.call('HSET', h, 'p:' .. a, rid)
    if b ~= '' then redis.call('HSET', h, 'p:' .. b, rid) end
  end
  redis.call('HSET', h, 'r:' .. rid, mode .. '|' .. a .. '|' .. b .. '|' .. ext .. '|')
  redis.call('ZADD', rkey(n), expire, rid)
  if redis.call('SREM', AVAIL, n) == 1 then count_taken(1) end
  redis.call('HSET', MODE, n, mode)
  redis.call('ZADD', zset, live + 1, n)
  redis.call('ZADD', DUE, 'LT', expire, n)
  history(n, 'assign', { 'detail', describe({ mode, a, b, ext, '' }), 'rid', rid })
  redis.call('SET', answer_key, n .. '|' .. ext .. '|' .. string.format('%d', expire), 'PXAT', string.format('%d', expire))
  return { 'ok', n, ext, expire }
end

local function fresh()
  for _ = 1, 3 do
    local n = redis.call('SRANDMEMBER', AVAIL)
    if not n then return nil end
    -- Invariant: a free number has no live reservation. Checked anyway: a broken invariant never double-books
    -- (the number leaves the free set and the next random one is tried).
    if prune(n, false) == 0 then return reserve(n, 0) end
    redis.call('SREM', AVAIL, n)
  end
  return nil
end

if mode == 'AXN' then
  return fresh() or { 'exhausted' }
end

-- AXB / AXE: the least-loaded numbers already serving this mode first (spread), a fresh number once they
-- reach the target load, and above the target (up to max) only when no fresh number is left.
-- The index's load and the party fields may be stale-high until the number is pruned: that can only make a
-- candidate look worse (skipped), never double-book it; a candidate that looks usable is pruned and re-checked.
local function usable(n, indexed_load)
  if indexed_load >= max or not fits(n) then return nil end
  local live = prune(n, false)
  if live > 0 and live < max then return live end
  return nil
end

local over_target = {}
local lowest = redis.call('ZRANGE', zset, 0, candidates - 1, 'WITHSCORES')
for i = 1, #lowest, 2 do
  local n = lowest[i]
  local live = usable(n, tonumber(lowest[i + 1]))
  if live then
    if live < target then
      local done = reserve(n, live)
      if done then return done end
    else
      over_target[#over_target + 1] = { n, live }
    end
  end
end
local done = fresh()
if done then return done end
table.sort(over_target, function(x, y) return x[2] < y[2] end)
for _, c in ipairs(over_target) do
  done = reserve(c[1], c[2])
  if done then return done end
end
-- The lowest ones all conflict or are full: a random sample of the rest.
local sample = redis.call('ZRANDMEMBER', zset, candidates, 'WITHSCORES')
for i = 1, #sample, 2 do
  local n = sample[i]
  local live = usable(n, tonumber(sample[i + 1]))
  if live then
    done = reserve(n, live)
    if done then return done end
  end
end
return { 'exhausted' }
