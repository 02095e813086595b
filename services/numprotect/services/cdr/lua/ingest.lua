-- Stores a group of CDRs of ONE bucket (tenant or unmatched) exactly once, with indexes and counters.
-- Dedup and store happen in this one script on one slot: a record is never "seen" without being stored.
-- KEYS[1] stream, KEYS[2] time index; then 6 keys per record:
--   dedup key, daily counters, binding index, order index, abuse counters (window, X), flagged pairs (window)
-- ARGV[1] retention ms, ARGV[2] abuse threshold, ARGV[3] record count; then 7 args per record:
--   payload, call ms, flags (1 binding index, 2 order index, 4 abuse, 8 answered, 16 short, 32 unanswered),
--   billable seconds, abuse field (caller), abuse member ("X|caller"), abuse expiry (ms epoch)
-- Optional: KEYS[3 + 6 * count] the answer key of this call (unique per call) and ARGV[4 + 7 * count] how long it is
--   kept (ms): the reply is kept there, and a repeat of the call (a cluster client re-sends a script whose reply it
--   lost) gets the same reply instead of "duplicate" for the records the first run stored.
-- Optional, after those two (events for tenants, numprotect.core.event_keys): KEYS[4 + 6 * count] the outbox of the
--   bucket's slot; ARGV[5 + 7 * count] the tenant, ARGV[6 + 7 * count] the abuse window length (ms). Each record
--   stored records cdr.created there (fields ty, tn, at = the stream id's ms, src = "<carrier_id>|<call_id>", read
--   from its dedup key "<C>:id:<len(carrier_id)>:<carrier_id>:<call_id>", n "", d = the payload as stored); each
--   pair newly flagged in its window records abuse.flagged (at = now, src = "X|caller", n "",
--   d = "<window start ms>|<short>|<unanswered>|<total>"). A repeat records nothing again (the kept reply, the dedup
--   key, the flagged set).
-- Returns one entry per record: the new stream id, or 0 when the call_id was already stored (duplicate); then one more:
--   how many (virtual number, caller) pairs this call flagged (newly in their window's flagged set: each flag once).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local retention = tonumber(ARGV[1])
local abuse_min = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local cutoff = now - retention
local stream = KEYS[1]
local time_index = KEYS[2]
local out = {}
local flagged = 0
local answer_key = KEYS[3 + 6 * n]
local outbox = KEYS[4 + 6 * n]
local tenant = ARGV[5 + 7 * n]
local window_length = tonumber(ARGV[6 + 7 * n])

-- "<carrier_id>|<call_id>" of a dedup key "<C>:id:<len(carrier_id)>:<carrier_id>:<call_id>" (cdr_keys.Bucket.dedup).
local function source(dedup)
  local length, rest = string.match(dedup, '}:id:(%d+):(.*)$')
  length = tonumber(length)
  return string.sub(rest, 1, length) .. '|' .. string.sub(rest, length + 2)
end

if answer_key then
  local kept = redis.call('GET', answer_key)
  if kept then
    for item in string.gmatch(kept, '[^,]+') do
      out[#out + 1] = item == '0' and 0 or item
    end
    return out
  end
end

local function has(flags, bit)
  return math.floor(flags / bit) % 2 == 1
end

local function index(key, score, id)
  redis.call('ZADD', key, score, id)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. cutoff)
  redis.call('PEXPIRE', key, retention)
end

for i = 0, n - 1 do
  local k = 2 + i * 6
  local a = 3 + i * 7
  local dedup = KEYS[k + 1]
  if redis.call('EXISTS', dedup) == 1 then
    out[i + 1] = 0
  else
    local payload = ARGV[a + 1]
    local call_ms = tonumber(ARGV[a + 2])
    local flags = tonumber(ARGV[a + 3])
    local billable = tonumber(ARGV[a + 4])
    local id = redis.call('XADD', stream, 'MINID', cutoff, '*', 'p', payload)
    redis.call('SET', dedup, id, 'PX', retention)
    index(time_index, call_ms, id)
    if has(flags, 1) then index(KEYS[k + 3], call_ms, id) end
    if has(flags, 2) then index(KEYS[k + 4], call_ms, id) end
    local daily = KEYS[k + 2]
    redis.call('HINCRBY', daily, 'calls', 1)
    if has(flags, 8) then redis.call('HINCRBY', daily, 'answered', 1) end
    if billable > 0 then redis.call('HINCRBY', daily, 'billable', billable) end
    redis.call('PEXPIRE', daily, retention + 86400000)
    if outbox then
      redis.call('XADD', outbox, '*', 'ty', 'cdr.created', 'tn', tenant, 'at', string.match(id, '^%d+'),
        'src', source(dedup), 'n', '', 'd', payload)
    end
    if has(flags, 4) then
      local counters = KEYS[k + 5]
      local caller = ARGV[a + 5]
      local abuse_at = ARGV[a + 7]
      local total = redis.call('HINCRBY', counters, caller .. ':t', 1)
      local short, unanswered
      if has(flags, 16) then short = redis.call('HINCRBY', counters, caller .. ':s', 1) else
        short = tonumber(redis.call('HGET', counters, caller .. ':s') or '0') end
      if has(flags, 32) then unanswered = redis.call('HINCRBY', counters, caller .. ':u', 1) else
        unanswered = tonumber(redis.call('HGET', counters, caller .. ':u') or '0') end
      local bad = short + unanswered
      redis.call('PEXPIREAT', counters, abuse_at)
      if bad >= abuse_min then
        local new = redis.call('ZADD', KEYS[k + 6], bad, ARGV[a + 6])
        flagged = flagged + new
        redis.call('PEXPIREAT', KEYS[k + 6], abuse_at)
        if new == 1 and outbox then
          local window = call_ms - call_ms % window_length
          redis.call('XADD', outbox, '*', 'ty', 'abuse.flagged', 'tn', tenant, 'at', string.format('%d', now),
            'src', ARGV[a + 6], 'n', '',
            'd', string.format('%d|%d|%d|%d', window, short, unanswered, total))
        end
      end
    end
    out[i + 1] = id
  end
end
out[n + 1] = flagged
if answer_key then
  local items = {}
  for i = 1, n + 1 do items[i] = tostring(out[i]) end
  redis.call('SET', answer_key, table.concat(items, ','), 'PX', ARGV[4 + 7 * n])
end
return out
