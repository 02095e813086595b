-- Claims an order (tenant_id, out_order_id) for one create, or tells who holds it.
-- KEYS[1]  np:ord:{<tenant>:<order>}: "<state>|<binding_id>|<fingerprint>|<deadline_ms>", state p (pending) or d (done)
-- ARGV[1]  binding_id of this create
-- ARGV[2]  fingerprint of the request (every field)
-- ARGV[3]  deadline_ms: until when this create may finish
-- ARGV[4]  expire_at_ms of the key (binding end + retention)
-- ARGV[5]  the fingerprint an order key written before version 2 holds for this request (mode and parties), or ""
-- Returns {"claimed", binding_id} (also to a repeat of this very call: the key holds the value it wrote)
--       | {"done", holder} | {"conflict", holder}: done by another request
--       | {"busy", holder}: a create of the order runs and its deadline has not passed (whatever its request)
--       | {"taken", previous}: the pending create `previous` missed its deadline; the order is this create's now,
--         `previous` can no longer commit (order_commit.lua) and the caller rolls it back.
local current = redis.call('GET', KEYS[1])
local value = 'p|' .. ARGV[1] .. '|' .. ARGV[2] .. '|' .. ARGV[3]
if not current then
  redis.call('SET', KEYS[1], value, 'PXAT', ARGV[4])
  return {'claimed', ARGV[1]}
end
-- A repeat of this call (a cluster client re-sends a script whose reply it lost): the claim is ours already.
-- Without this the create would wait on itself as 'busy', or past its deadline take the order from itself.
if current == value then
  return {'claimed', ARGV[1]}
end
local state, holder, fingerprint, deadline = string.match(current, '^(%a)|([^|]*)|([^|]*)|(%d*)$')
if not state then
  return redis.error_reply('order key ' .. KEYS[1] .. ' holds an unknown value')
end
if state == 'd' then
  if fingerprint ~= ARGV[2] and (ARGV[5] == '' or fingerprint ~= ARGV[5]) then
    return {'conflict', holder}
  end
  return {'done', holder}
end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
if tonumber(deadline) > now_ms then
  return {'busy', holder}
end
redis.call('SET', KEYS[1], value, 'PXAT', ARGV[4])
return {'taken', holder}
