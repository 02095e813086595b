-- Applies one binding's change to the keys of one virtual number, atomically: its route keys and, when given, its
-- entry in the number's history (np:nh:{X}: the same slot, so a create writes both in one command).
-- KEYS[1]                 AXE marker of the number
-- KEYS[2..1+ndel]         route keys to delete, if they still hold this binding
-- KEYS[2+ndel..1+ndel+nset] route keys to set to ARGV[2], expiring at ARGV[3] (ms since epoch)
-- KEYS[2+ndel+nset]       with ARGV[7]: the number's history
-- ARGV: binding_id, value, expire_at_ms, ndel, nset, is_axe[, history_end_ms, retention_ms]
--   history_end_ms: the binding's score in the history, only ever raised (an extension), never lowered (a stale
--   higher score is harmless: readers check the record); entries that ended more than retention_ms ago are removed
--   and the key expires at the newest end + retention (only ever pushed later).
-- Returns 1, or {"CONFLICT", key, holder} (nothing written, the history neither) when another binding holds a key
-- to set.
local binding_id = ARGV[1]
local value = ARGV[2]
local expire_at = tonumber(ARGV[3])
local ndel = tonumber(ARGV[4])
local nset = tonumber(ARGV[5])
local prefix = binding_id .. '|'

local function holder(key)
  local current = redis.call('GET', key)
  if not current then return nil end
  return string.sub(current, 1, string.find(current, '|', 1, true) - 1)
end

-- Check every key first so that a conflict writes nothing.
for i = 2 + ndel, 1 + ndel + nset do
  local owner = holder(KEYS[i])
  if owner and owner ~= binding_id then
    return {'CONFLICT', KEYS[i], owner}
  end
end

for i = 2, 1 + ndel do
  local current = redis.call('GET', KEYS[i])
  if current and string.sub(current, 1, #prefix) == prefix then
    redis.call('DEL', KEYS[i])
  end
end

local now_ms = nil
if nset > 0 or ARGV[7] then
  local now = redis.call('TIME')
  now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
end

if nset > 0 then
  for i = 2 + ndel, 1 + ndel + nset do
    if expire_at > now_ms then
      redis.call('SET', KEYS[i], value, 'PXAT', expire_at)
    else
      redis.call('DEL', KEYS[i])
    end
  end
  -- The marker lives as long as the longest AXE binding on the number.
  if ARGV[6] == '1' and expire_at > now_ms and redis.call('PEXPIRETIME', KEYS[1]) < expire_at then
    redis.call('SET', KEYS[1], '1', 'PXAT', expire_at)
  end
end

if ARGV[7] then
  local history = KEYS[2 + ndel + nset]
  local end_ms = tonumber(ARGV[7])
  local retention = tonumber(ARGV[8])
  redis.call('ZREMRANGEBYSCORE', history, '-inf', '(' .. (now_ms - retention))
  -- ZADD GT adds new members and raises, never lowers, the score of existing ones.
  redis.call('ZADD', history, 'GT', end_ms, binding_id)
  local keep_until = end_ms + retention
  local current = redis.call('PEXPIRETIME', history)
  if current == -1 or current < keep_until then
    redis.call('PEXPIREAT', history, keep_until)
  end
end
return 1
