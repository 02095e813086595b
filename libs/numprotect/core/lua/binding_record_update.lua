-- Changes fields of an existing binding record and appends one event to its history.
-- KEYS[1]  the record hash
-- KEYS[2]  (with ARGV[3]) a key of the record's slot to delete when it holds ARGV[3]: the lock of the call that
--          writes, released by its last write
-- ARGV[1]  new expire_at_ms of the record (binding end + retention), or 0 to keep it
-- ARGV[2]  event to append ("<kind>|<ms>|k=v,..."), or "" for none
-- ARGV[3]  the value KEYS[2] holds while it is to be deleted, or "" (no KEYS[2])
-- ARGV[4..] field, value, field, value, ...
-- Returns 1 when written, 0 when the record does not exist (nothing written, nothing deleted).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
if #ARGV >= 5 then
  local fields = {}
  for i = 4, #ARGV do
    fields[#fields + 1] = ARGV[i]
  end
  redis.call('HSET', KEYS[1], unpack(fields))
end
-- An event equal to the last one is not appended again: that is a repeat of this call (a cluster client re-sends
-- a script whose reply it lost; an event names its millisecond), whose fields are set already.
if ARGV[2] ~= '' then
  local last = redis.call('HGET', KEYS[1], 'n')
  if not last or redis.call('HGET', KEYS[1], 'h' .. last) ~= ARGV[2] then
    local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
    redis.call('HSET', KEYS[1], 'h' .. n, ARGV[2])
  end
end
if tonumber(ARGV[1]) > 0 then
  redis.call('PEXPIREAT', KEYS[1], ARGV[1])
end
if ARGV[3] ~= '' and redis.call('GET', KEYS[2]) == ARGV[3] then
  redis.call('DEL', KEYS[2])
end
return 1
