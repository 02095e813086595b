-- Decides the outcome of a create that did not finish, on its order key: the one place besides the commit
-- (order_commit.lua) where a pending claim changes, so a create is either committed or aborted, never both.
-- KEYS[1]  the order key
-- ARGV[1]  binding_id of the create
-- ARGV[2]  "1": the create itself asks (it may abort its own claim at any time); "0": recovery asks (it may abort
--          the claim only once its deadline has passed, by the server's clock)
-- Returns "done" (committed: roll forward) | "aborted" (the claim was the create's and is deleted now: roll back)
--       | "gone" (the order is not the create's: roll back) | "busy" (recovery only: the deadline has not passed)
local current = redis.call('GET', KEYS[1])
if not current then
  return 'gone'
end
local state, holder, _, deadline = string.match(current, '^(%a)|([^|]*)|([^|]*)|(%d*)$')
if holder ~= ARGV[1] then
  return 'gone'
end
if state == 'd' then
  return 'done'
end
if ARGV[2] ~= '1' then
  local now = redis.call('TIME')
  local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  if tonumber(deadline) > now_ms then
    return 'busy'
  end
end
redis.call('DEL', KEYS[1])
return 'aborted'
