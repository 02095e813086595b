#!lua flags=no-writes
-- One chunk of ReplayEvents' read of a tenant's log: the ids of the entries whose event time is in the range and
-- whose type the endpoint wants, without sending their bodies back (a replay of a busy tenant's 3 days reads many
-- chunks; each is one short call, so Redis serves others between them).
-- KEYS[1]  the tenant's log (stream: fields id, ty, at, p)
-- ARGV[1]  where to read from: an XRANGE start ("<ms>-0" or "(<entry id>")
-- ARGV[2]  the range's start ms; ARGV[3] its end ms (exclusive)
-- ARGV[4]  how many log entries to read
-- ARGV[5..] the types wanted (none: every type)
-- Returns {the last entry id read, or "" when the log ends within this chunk; the ids chosen...}.
local count = tonumber(ARGV[4])
local entries = redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', count)
local start_ms, end_ms = tonumber(ARGV[2]), tonumber(ARGV[3])
local wanted = nil
if #ARGV >= 5 then
  wanted = {}
  for i = 5, #ARGV do
    wanted[ARGV[i]] = true
  end
end
local out = {''}
for _, entry in ipairs(entries) do
  local fields = entry[2]
  local at, kind = nil, nil
  for i = 1, #fields, 2 do
    if fields[i] == 'at' then
      at = tonumber(fields[i + 1])
    elseif fields[i] == 'ty' then
      kind = fields[i + 1]
    end
  end
  if at ~= nil and at >= start_ms and at < end_ms and (wanted == nil or wanted[kind]) then
    out[#out + 1] = entry[1]
  end
end
if #entries == count then
  out[1] = entries[#entries][1]
end
return out
