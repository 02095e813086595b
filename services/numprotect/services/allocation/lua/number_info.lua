-- A number's state after pruning lapsed reservations. pool_lib.lua is prepended.
-- ARGV[4] number. Returns {'ok', state, live, mode, lock_reason, cooling_until_ms} | {'unknown'}.
local n = ARGV[4]
if not known(n) then return { 'unknown' } end
return reply_info('ok', n)
