-- Claims due deliveries of a tenant's endpoints for one dispatcher (all keys in the tenant's slot).
-- Per endpoint whose ready score has come (and no pause runs): leases that ran out (a dispatcher lost mid-request)
-- are due again at once (or dead, after the last attempt); then up to (concurrency - requests in flight) requests
-- of up to batch-size due events each move from the queue to in flight, under one lease end per request (unique
-- within the endpoint: the requests in flight are the distinct lease ends), each event's attempt counted now. The
-- ready score is then set to when the endpoint next needs a claim: its first due event (now when more are due than
-- were claimed), or its first lease end (a settle lowers it sooner), or it is removed when nothing is left.
-- KEYS[1]  the tenant's ready zset, KEYS[2] the tenant's log (stream: id, ty, at, p)
-- per endpoint: its queue, in flight, attempts, delivery state, dead letters, dead letters' errors (6 keys)
-- ARGV[1]  lease ms, ARGV[2] most requests to claim in all, ARGV[3] attempts per event
-- per endpoint: its id, its concurrency, its batch size (3 values)
-- Returns {now ms, next ms (earliest ready score of these endpoints, -1: none), events dead, events dropped (gone
-- from the log), requests}; a request is {endpoint id, lease end, {{log id, event id, type, payload, attempt}...}}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease_ms = tonumber(ARGV[1])
local budget = tonumber(ARGV[2])
local max_attempts = tonumber(ARGV[3])
local LOST = 'no result within the lease: the dispatcher sending it was lost'
local requests = {}
local dead, dropped = 0, 0
local next_ms = -1
local function earlier(ms)
  if next_ms < 0 or ms < next_ms then
    next_ms = ms
  end
end

local endpoints = (#ARGV - 3) / 3
for e = 0, endpoints - 1 do
  local ep = ARGV[4 + 3 * e]
  local limit = tonumber(ARGV[5 + 3 * e])
  local batch = tonumber(ARGV[6 + 3 * e])
  local k = 3 + 6 * e
  local queue, in_flight, attempts, state, dead_letters, dead_errors =
    KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], KEYS[k + 5]
  local ready = tonumber(redis.call('ZSCORE', KEYS[1], ep) or '-1')
  local pause = tonumber(redis.call('HGET', state, 'pause') or '0')
  if ready >= 0 and ready > now then
    earlier(ready)
  elseif ready >= 0 and pause > now then
    redis.call('ZADD', KEYS[1], pause, ep)
    earlier(pause)
  elseif ready >= 0 then
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', in_flight, '-inf', now)) do
      redis.call('ZREM', in_flight, id)
      if tonumber(redis.call('HGET', attempts, id) or '0') >= max_attempts then
        redis.call('ZADD', dead_letters, now, id)
        redis.call('HSET', dead_errors, id, LOST)
        dead = dead + 1
      else
        redis.call('ZADD', queue, now, id)
      end
    end
    local ends, requests_in_flight = {}, 0
    local live = redis.call('ZRANGEBYSCORE', in_flight, '(' .. now, '+inf', 'WITHSCORES')
    for i = 2, #live, 2 do
      local score = tonumber(live[i])
      if not ends[score] then
        ends[score] = true
        requests_in_flight = requests_in_flight + 1
      end
    end
    local lease_end = now + lease_ms
    while budget > 0 and requests_in_flight < limit do
      local ids = redis.call('ZRANGEBYSCORE', queue, '-inf', now, 'LIMIT', 0, batch)
      if #ids == 0 then
        break
      end
      while ends[lease_end] do
        lease_end = lease_end + 1
      end
      local events = {}
      for _, id in ipairs(ids) do
        redis.call('ZREM', queue, id)
        local entry = redis.call('XRANGE', KEYS[2], id, id)
        if #entry == 0 then
          -- Trimmed from the log (older than the retention): nothing left to send.
          redis.call('HDEL', attempts, id)
          dropped = dropped + 1
        else
          local fields = {}
          local raw = entry[1][2]
          for i = 1, #raw, 2 do
            fields[raw[i]] = raw[i + 1]
          end
          local attempt = redis.call('HINCRBY', attempts, id, 1)
          redis.call('ZADD', in_flight, lease_end, id)
          events[#events + 1] = { id, fields['id'] or '', fields['ty'] or '', fields['p'] or '', attempt }
        end
      end
      if #events > 0 then
        ends[lease_end] = true
        requests[#requests + 1] = { ep, lease_end, events }
        requests_in_flight = requests_in_flight + 1
        budget = budget - 1
      end
    end
    local due = -1
    if requests_in_flight < limit then
      local first = redis.call('ZRANGE', queue, 0, 0, 'WITHSCORES')
      if #first > 0 then
        due = math.max(tonumber(first[2]), now)
      end
    end
    local first_lease = redis.call('ZRANGE', in_flight, 0, 0, 'WITHSCORES')
    if #first_lease > 0 and (due < 0 or tonumber(first_lease[2]) < due) then
      due = tonumber(first_lease[2])
    end
    if due < 0 and redis.call('EXISTS', queue) == 1 then
      -- (Only with a concurrency below 1:) queued work never goes without a ready score.
      due = now
    end
    if due < 0 then
      redis.call('ZREM', KEYS[1], ep)
    else
      redis.call('ZADD', KEYS[1], due, ep)
      earlier(due)
    end
  end
end
return { now, next_ms, dead, dropped, requests }
