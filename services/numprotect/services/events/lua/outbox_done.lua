-- Removes routed (or dropped) entries from a slot's outbox and gives the lease back if this router still holds it.
-- KEYS[1]  the slot's outbox; KEYS[2] the slot's route lease
-- ARGV[1]  this router's token; ARGV[2..] entry ids
-- Returns how many entries were removed.
local removed = 0
if #ARGV >= 2 then
  removed = redis.call('XDEL', KEYS[1], unpack(ARGV, 2))
end
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
end
return removed
