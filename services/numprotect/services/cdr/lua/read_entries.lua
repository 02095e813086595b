#!lua flags=no-writes
-- The records of one bucket's stream under the given stream ids, in that order; an id whose record was trimmed
-- (retention) is left out.
-- KEYS[1] stream; ARGV the ids.
-- Returns {id1, payload1, id2, payload2, ...}.
local out = {}
for _, id in ipairs(ARGV) do
  local entry = redis.call('XRANGE', KEYS[1], id, id)
  if #entry == 1 then
    local fields = entry[1][2]
    for f = 1, #fields, 2 do
      if fields[f] == 'p' then
        out[#out + 1] = id
        out[#out + 1] = fields[f + 1]
      end
    end
  end
end
return out
