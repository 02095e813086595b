-- Removes routed (or dropped) entries from a slot's outbox and gives the lease back if this router still holds it.
-- An outbox left empty is deleted (an empty stream still holds ~325 B; up to 16,384 of them): safe, as a script
-- runs alone, and a producer's next XADD creates it again.
-- KEYS[1]  the slot's outbox; KEYS[2] the slot's route lease
-- ARGV[1]  this router's token; ARGV[2..] entry ids
-- Returns how many entries were removed.
local removed = 0
if #ARGV >= 2 then
  removed = redis.call('XDEL', KEYS[1], unpack(ARGV, 2))
  if redis.call('XLEN', KEYS[1]) == 0 then
    redis.call('DEL', KEYS[1])
  end
end
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
end
return removed
