-- Applies one binding's change to the route table of one virtual number, atomically.
-- KEYS[1]            AXE marker of the number
-- KEYS[2..1+ndel]    route keys to delete, if they still hold this binding
-- KEYS[2+ndel..]     route keys to set to ARGV[2], expiring at ARGV[3] (ms since epoch)
-- ARGV: binding_id, value, expire_at_ms, ndel, nset, is_axe
-- Returns 1, or {"CONFLICT", key, holder} (nothing written) when another binding holds a key to set.
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

if nset > 0 then
  local now = redis.call('TIME')
  local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
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
return 1
