-- Settles one request a dispatcher sent (all keys in the tenant's slot): records the attempt, then, for each of its
-- events still under this request's lease (not taken over after the lease ran out): a success forgets it; a failure
-- queues it again after its delay (and never before the receiver's Retry-After), or, after its last attempt, makes
-- it a dead letter (a success also ends a dead letter that ReplayEvents queued again). A 429, 5xx or no answer
-- ('slow') pauses the endpoint: for the Retry-After, else for a backoff that doubles with each consecutive such
-- failure (a success resets the count). An endpoint deleted meanwhile is left alone (no key of it is made again).
-- KEYS[1]  the tenant's endpoints hash, KEYS[2] its ready zset; the endpoint's: KEYS[3] queue, KEYS[4] in flight,
--          KEYS[5] attempts, KEYS[6] dead letters, KEYS[7] their errors, KEYS[8] delivery attempts (stream),
--          KEYS[9] delivery state (hash: pause, fails)
-- ARGV[1]  endpoint id, ARGV[2] the request's lease end, ARGV[3] outcome: 'ok', 'fail' or 'slow' (fail and pause),
-- ARGV[4]  HTTP status (0: none), ARGV[5] latency us, ARGV[6] error, ARGV[7] Retry-After ms (-1: none),
-- ARGV[8]  backoff of the first pause ms, ARGV[9] longest backoff ms, ARGV[10] retention ms,
-- ARGV[11] attempts per event, ARGV[12] when the request was sent (ms)
-- then per event: log id, event id, type, attempt number, delay ms before its next attempt (5 values)
-- Returns {events settled (still under this lease), events dead now, next due ms (-1: none queued), now ms}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ep, lease_end, outcome = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local err, retry_after = ARGV[6], tonumber(ARGV[7])
local retention, max_attempts = tonumber(ARGV[10]), tonumber(ARGV[11])
if redis.call('HEXISTS', KEYS[1], ep) == 0 then
  return { 0, 0, -1, now }
end
local queue, in_flight, attempts, dead_letters, dead_errors = KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local event_ids, types, numbers = {}, {}, {}
local settled, dead, next_due = 0, 0, -1
for i = 13, #ARGV, 5 do
  local id, attempt, delay = ARGV[i], tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
  event_ids[#event_ids + 1] = ARGV[i + 1]
  types[#types + 1] = ARGV[i + 2]
  numbers[#numbers + 1] = ARGV[i + 3]
  if tonumber(redis.call('ZSCORE', in_flight, id) or '-1') == lease_end then
    settled = settled + 1
    redis.call('ZREM', in_flight, id)
    if outcome == 'ok' then
      redis.call('HDEL', attempts, id)
      -- A dead letter replayed (ReplayEvents queues it again) is delivered now: no dead letter any more.
      redis.call('ZREM', dead_letters, id)
      redis.call('HDEL', dead_errors, id)
    elseif attempt >= max_attempts then
      redis.call('ZADD', dead_letters, now, id)
      redis.call('HSET', dead_errors, id, err)
      dead = dead + 1
    else
      local due = now + math.max(delay, retry_after)
      redis.call('ZADD', queue, 'NX', due, id)
      if next_due < 0 or due < next_due then
        next_due = due
      end
    end
  end
end
redis.call(
  'XADD', KEYS[8], 'MINID', '~', now - retention, '*',
  't', ARGV[12], 's', ARGV[4], 'l', ARGV[5], 'e', err,
  'ids', table.concat(event_ids, ' '), 'ty', table.concat(types, ' '), 'n', table.concat(numbers, ' ')
)
if outcome == 'ok' then
  redis.call('HDEL', KEYS[9], 'fails')
elseif outcome == 'slow' then
  local fails = redis.call('HINCRBY', KEYS[9], 'fails', 1)
  local pause = retry_after
  if pause < 0 then
    pause = math.min(tonumber(ARGV[8]) * 2 ^ math.min(fails - 1, 40), tonumber(ARGV[9]))
  end
  local until_ms = now + math.floor(pause)
  if until_ms > tonumber(redis.call('HGET', KEYS[9], 'pause') or '0') then
    redis.call('HSET', KEYS[9], 'pause', until_ms)
  end
end
-- A request slot is free (and maybe events are queued again): the endpoint needs a claim at its first due event.
local first = redis.call('ZRANGE', queue, 0, 0, 'WITHSCORES')
if #first > 0 then
  redis.call('ZADD', KEYS[2], 'LT', first[2], ep)
  if next_due < 0 or tonumber(first[2]) < next_due then
    next_due = tonumber(first[2])
  end
end
if dead > 0 then
  -- Dead letters older than the retention have lost their log entry: they go (a few at a time).
  local expired = redis.call('ZRANGEBYSCORE', dead_letters, '-inf', now - retention, 'LIMIT', 0, 100)
  for _, id in ipairs(expired) do
    redis.call('ZREM', dead_letters, id)
    redis.call('HDEL', dead_errors, id)
    redis.call('HDEL', attempts, id)
  end
end
return { settled, dead, next_due, now }
