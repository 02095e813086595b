#!lua flags=no-writes
-- One bucket's share of a listing over several buckets: up to `limit` entries of one index ZSET (score = call
-- time ms, member = stream id) in (score, member) order after the cursor, without the records (the caller merges
-- the buckets' entries, then reads the records of the ones it keeps with read_entries.lua).
-- KEYS[1] index ZSET
-- ARGV: min score, max score, after score ("" = none), after member, inclusive (1: an entry equal to the cursor
--   counts as after it: the cursor is in an earlier bucket), limit
-- Returns {more (0/1: entries beyond these), score1, member1, score2, member2, ...}.
local index = KEYS[1]
local min_score, max_score = ARGV[1], ARGV[2]
local after_score, after_member = ARGV[3], ARGV[4]
local inclusive = ARGV[5] == '1'
local limit = tonumber(ARGV[6])
local start = min_score
if after_score ~= '' then start = after_score end

local out = {}
local found, offset = 0, 0
local chunk = limit + 1
while found <= limit do
  local batch = redis.call('ZRANGE', index, start, max_score, 'BYSCORE', 'LIMIT', offset, chunk, 'WITHSCORES')
  if #batch == 0 then break end
  offset = offset + #batch / 2
  for j = 1, #batch, 2 do
    local member, score = batch[j], batch[j + 1]
    local after = true
    if after_score ~= '' and tonumber(score) == tonumber(after_score) then
      after = member > after_member or (inclusive and member == after_member)
    end
    if after then
      found = found + 1
      if found > limit then break end
      out[#out + 1] = score
      out[#out + 1] = member
    end
  end
  if #batch / 2 < chunk then break end
end
local reply = {found > limit and 1 or 0}
for _, v in ipairs(out) do reply[#reply + 1] = v end
return reply
