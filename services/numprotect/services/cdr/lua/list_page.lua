#!lua flags=no-writes
-- One page of a bucket's records from one index ZSET (score = call time ms, member = stream id), in
-- (score, member) order, strictly after the cursor (after_score, after_member) when one is given.
-- KEYS[1] index ZSET, KEYS[2] stream
-- ARGV: min score, max score, after score ("" = none), after member, limit, max members to scan
-- Returns {more (0/1), last score, last member, id1, payload1, id2, payload2, ...}. Index entries whose record
-- was trimmed from the stream are skipped (and still move the cursor).
local index, stream = KEYS[1], KEYS[2]
local min_score, max_score = ARGV[1], ARGV[2]
local after_score, after_member = ARGV[3], ARGV[4]
local limit = tonumber(ARGV[5])
local max_scan = tonumber(ARGV[6])
local start = min_score
if after_score ~= '' then start = after_score end

local out = {}
local found, scanned, offset = 0, 0, 0
local last_score, last_member = after_score, after_member
local chunk = limit + 1
local exhausted = false
while found < limit and scanned < max_scan do
  local batch = redis.call('ZRANGE', index, start, max_score, 'BYSCORE', 'LIMIT', offset, chunk, 'WITHSCORES')
  if #batch == 0 then exhausted = true break end
  offset = offset + #batch / 2
  for j = 1, #batch, 2 do
    local member, score = batch[j], batch[j + 1]
    local after = true
    if after_score ~= '' and tonumber(score) == tonumber(after_score) and member <= after_member then
      after = false
    end
    if after then
      scanned = scanned + 1
      last_score, last_member = score, member
      local entry = redis.call('XRANGE', stream, member, member)
      if #entry == 1 then
        local fields = entry[1][2]
        for f = 1, #fields, 2 do
          if fields[f] == 'p' then
            out[#out + 1] = member
            out[#out + 1] = fields[f + 1]
          end
        end
        found = found + 1
      end
      if found >= limit or scanned >= max_scan then break end
    end
  end
end

local more = 0
if not exhausted and last_score ~= '' then
  -- Anything after the cursor?
  local probe = redis.call('ZRANGE', index, last_score, max_score, 'BYSCORE', 'LIMIT', 0, 64, 'WITHSCORES')
  for j = 1, #probe, 2 do
    if tonumber(probe[j + 1]) > tonumber(last_score) or probe[j] > last_member then
      more = 1
      break
    end
  end
  if more == 0 and #probe == 128 then more = 1 end
end
local reply = {more, last_score, last_member}
for _, v in ipairs(out) do reply[#reply + 1] = v end
return reply
