-- Claims an order (tenant_id, out_order_id) for one create, or tells who holds it.
-- KEYS[1]  np:ord:{<tenant>:<order>}: "<state>|<binding_id>|<fingerprint>|<deadline_ms>", state p (pending) or d (done)
-- ARGV[1]  binding_id of this create
-- ARGV[2]  fingerprint of the order's parties
-- ARGV[3]  deadline_ms: until when this create may finish
-- ARGV[4]  expire_at_ms of the key (binding end + retention)
-- ARGV[5]  the holder of a stale claim this create has cleaned up after, or ""
-- Returns {"claimed", binding_id} | {"done", holder} | {"busy", holder} | {"conflict", holder}
--       | {"stale", holder}: a pending claim whose deadline passed; clean up after it, then claim again naming it
--       | {"taken", previous}: the stale claim named in ARGV[5] now belongs to this create.
local current = redis.call('GET', KEYS[1])
local value = 'p|' .. ARGV[1] .. '|' .. ARGV[2] .. '|' .. ARGV[3]
if not current then
  redis.call('SET', KEYS[1], value, 'PXAT', ARGV[4])
  return {'claimed', ARGV[1]}
end
local state, holder, fingerprint, deadline = string.match(current, '^(%a)|([^|]*)|([^|]*)|(%d*)$')
if not state then
  return redis.error_reply('order key ' .. KEYS[1] .. ' holds an unknown value')
end
if state == 'd' then
  if fingerprint ~= ARGV[2] then
    return {'conflict', holder}
  end
  return {'done', holder}
end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
if tonumber(deadline) > now_ms then
  if fingerprint ~= ARGV[2] then
    return {'conflict', holder}
  end
  return {'busy', holder}
end
-- The pending create missed its deadline (crashed or stuck). The caller first cleans up what it left, then
-- takes the order over; the previous create can no longer commit (order_commit.lua).
if ARGV[5] ~= holder then
  return {'stale', holder}
end
redis.call('SET', KEYS[1], value, 'PXAT', ARGV[4])
return {'taken', holder}
