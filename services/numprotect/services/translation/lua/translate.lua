-- Translates one call to virtual number X: lock, route lookup, mode rules, tenant blocklist, rate limits.
-- One script, one round trip; every key carries the hash tag {X}.
-- KEYS[1] np:lock:{X}             lock flag (allocation)
-- KEYS[2] np:rt:{X}:c:<caller>    AXB route of the caller
-- KEYS[3] np:rt:{X}:n             AXN route
-- KEYS[4] np:rt:{X}:axe           AXE marker
-- KEYS[5] np:rt:{X}:e:<ext>       AXE route of the extension (only read when ARGV[2] == '1')
-- KEYS[6] np:rl:{X}:c:<caller>    rate counter per (X, caller)
-- ARGV: caller, has_extension, window_ms, caller_limit, binding_limit, blocked_tenants ('|t1|t2|' or ''),
--       binding counter key prefix 'np:rl:{X}:b:' (+ binding_id: same slot, built here)
-- Returns {decision, reason[, binding_id, tenant_id[, target, recording]]} with the proto enum numbers:
--   CONNECT {1, 0, binding_id, tenant_id, target, recording('1'|'0')[, why the rate limit was not enforced:
--            'MISCONF' | 'OOM' | 'NOREPLICAS' (Redis refused the counter's write) | 'NO_WRITES' (the read-only copy)]}
--   REJECT  {2, reason[, binding_id, tenant_id]}    COLLECT_EXTENSION {3, 0}
local caller = ARGV[1]
local has_extension = ARGV[2] == '1'

if redis.call('EXISTS', KEYS[1]) == 1 then
  return {2, 4}
end

local value = false
if has_extension then
  value = redis.call('GET', KEYS[5])
end
if not value then
  value = redis.call('GET', KEYS[2])
end
if not value then
  value = redis.call('GET', KEYS[3])
end
if not value then
  if redis.call('EXISTS', KEYS[4]) == 1 and not has_extension then
    return {3, 0}
  end
  return {2, 1}
end

-- binding_id|r1|tenant_id|mode|party_a|party_b|call_restriction|recording|allow_any_caller|expire_ms
local f = {}
local start = 1
for i = 1, 9 do
  local bar = string.find(value, '|', start, true)
  if not bar then
    return redis.error_reply('ERR route value with too few fields')
  end
  f[i] = string.sub(value, start, bar - 1)
  start = bar + 1
end
if f[2] ~= 'r1' then
  return redis.error_reply('ERR unknown route format ' .. f[2])
end
local binding_id, tenant_id, mode, party_a, party_b = f[1], f[3], f[4], f[5], f[6]
local restriction, recording, any_caller = f[7], f[8], f[9]

-- from_a: the call goes from party A towards the other side (B, or N for AXN).
local target, from_a
if caller == party_a then
  target, from_a = party_b, true
elseif mode == '1' then
  if caller ~= party_b then return {2, 1} end
  target, from_a = party_a, false
elseif mode == '2' then
  target, from_a = party_a, false
elseif mode == '3' then
  if caller ~= party_b and any_caller ~= '1' then return {2, 1} end
  target, from_a = party_a, false
else
  return {2, 1}
end
-- AXN without a default party (or AXE without B): A has nobody to reach.
if target == '' then
  return {2, 2, binding_id, tenant_id}
end
if (restriction == '2' and not from_a) or (restriction == '3' and from_a) then
  return {2, 2, binding_id, tenant_id}
end

if ARGV[6] ~= '' and string.find(ARGV[6], '|' .. tenant_id .. '|', 1, true) then
  return {2, 5, binding_id, tenant_id}
end

-- Rate counters. A write Redis refuses (MISCONF after a failed AOF/RDB write, OOM at maxmemory, NOREPLICAS under
-- min-replicas-to-write) or that the read-only copy of this script may not make (fastredis runs it while writes
-- are paused) does not stop the call: the limit is not enforced (fail open, translation is the read path) and the
-- reply names why. This script has no shebang on purpose: Redis then runs it under those conditions and refuses
-- only the write, so the decision still takes one round trip. Any other error (a counter of the wrong type) is
-- raised.
local window = tonumber(ARGV[3])
local function count(key)
  local n = redis.pcall('INCR', key)
  if type(n) == 'table' then
    local word = string.match(n.err, '^(%u+)')
    if word == 'MISCONF' or word == 'OOM' or word == 'NOREPLICAS' then return nil, word end
    if string.find(n.err, 'not allowed from read-only scripts', 1, true) then return nil, 'NO_WRITES' end
    return error(n)
  end
  if n == 1 then redis.call('PEXPIRE', key, window) end
  return n
end

local caller_limit = tonumber(ARGV[4])
if caller_limit > 0 then
  local n, refused = count(KEYS[6])
  if refused then return {1, 0, binding_id, tenant_id, target, recording, refused} end
  if n > caller_limit then return {2, 3, binding_id, tenant_id} end
end
local binding_limit = tonumber(ARGV[5])
if binding_limit > 0 then
  local n, refused = count(ARGV[7] .. binding_id)
  if refused then return {1, 0, binding_id, tenant_id, target, recording, refused} end
  if n > binding_limit then return {2, 3, binding_id, tenant_id} end
end

return {1, 0, binding_id, tenant_id, target, recording}
