-- Routes rendered events of one tenant (all keys in the tenant's slot): each event not seen before is appended to
-- the tenant's log and queued for every endpoint that wants it; an event seen before (a repeated outbox entry, a
-- route repeated after a crash, two routers at once) changes nothing.
-- KEYS[1]          the tenant's log (stream)
-- KEYS[2]          the tenant's ready zset (endpoint id -> earliest ms it may have work)
-- KEYS[3]          the tenant's endpoints (hash): an endpoint deleted since the caller read it gets nothing
-- KEYS[4..3+2E]    per endpoint: its queue (zset), its attempts (hash)
-- KEYS[4+2E..]     per event: its seen key
-- ARGV[1]          retention ms (log MINID, seen keys' PX)
-- ARGV[2]          E, the number of endpoints
-- ARGV[3..2+E]     the endpoint ids
-- then per event:  event id, type, at ms, body, and a string of E characters: "1" where the endpoint wants it
-- Returns, per event, 1 when it was logged now, 0 when it had been before.
local retention = tonumber(ARGV[1])
local endpoints = tonumber(ARGV[2])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local first_event_key = 4 + 2 * endpoints
local live = {}
for e = 1, endpoints do
  live[e] = redis.call('HEXISTS', KEYS[3], ARGV[2 + e]) == 1
end
local logged = {}
local arg = 3 + endpoints
local event = 0
while arg <= #ARGV do
  local seen = KEYS[first_event_key + event]
  event = event + 1
  local event_id, event_type, at, body, wanted = ARGV[arg], ARGV[arg + 1], ARGV[arg + 2], ARGV[arg + 3], ARGV[arg + 4]
  arg = arg + 5
  if redis.call('EXISTS', seen) == 1 then
    logged[event] = 0
  else
    local log_id = redis.call(
      'XADD', KEYS[1], 'MINID', '~', now - retention, '*', 'id', event_id, 'ty', event_type, 'at', at, 'p', body
    )
    redis.call('SET', seen, log_id, 'PX', retention)
    for e = 1, endpoints do
      if live[e] and string.sub(wanted, e, e) == '1' then
        redis.call('ZADD', KEYS[2 + 2 * e], 'NX', now, log_id)
        redis.call('HSET', KEYS[3 + 2 * e], log_id, 0)
        redis.call('ZADD', KEYS[2], 'LT', now, ARGV[2 + e])
      end
    end
    logged[event] = 1
  end
end
return logged
