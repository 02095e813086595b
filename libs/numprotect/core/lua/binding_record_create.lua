-- Creates a binding record (np:b:{id}) with its first event, unless the key already exists.
-- KEYS[1]  the record hash
-- ARGV[1]  expire_at_ms of the record (binding end + retention)
-- ARGV[2]  the create event ("create|<ms>|b=...,exp=...")
-- ARGV[3..] field, value, field, value, ...
-- Returns 1 when written (also to a repeat of this call: the record's first event is this create event, which
-- names the create's millisecond), 0 when the key existed (nothing written).
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('HGET', KEYS[1], 'h1') == ARGV[2] then
    return 1
  end
  return 0
end
local fields = {}
for i = 3, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
fields[#fields + 1] = 'n'
fields[#fields + 1] = '1'
fields[#fields + 1] = 'h1'
fields[#fields + 1] = ARGV[2]
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('PEXPIREAT', KEYS[1], ARGV[1])
return 1
