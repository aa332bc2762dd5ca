-- quotawatch's shared counters: one workspace's minute window, calendar
-- day, reservations and upstream blocks, changed atomically. Every replica
-- runs the same operations here, so a limit holds across all of them, and
-- every replica reads time from Redis (TIME), so skewed clocks agree.
--
-- KEYS (one workspace, all in one hash slot):
--   1 minute   HASH  "r<second>" / "t<second>" -> requests / tokens charged in that second
--   2 day      HASH  s (day start, ms), r, t
--   3 res      HASH  reservation id -> "charged_ms|tokens|probe|model"
--   4 expiry   ZSET  reservation id scored by when it expires (ms)
--   5 hold     STRING until (ms): the upstream said to wait (a transient 429)
--   6 billing  HASH  code, since, probe (ms of the next probe)
--   7 version  STRING the state's version, raised by every change
--
-- ARGV[1] is the operation; ARGV[2..7] are the day bounds (ms) around the
-- caller's now: yesterday, today and tomorrow in the workspace's timezone,
-- of which the one holding Redis's now applies. The rest depends on the
-- operation (see each branch below).
--
-- Every operation answers the state after it:
--   {outcome, now, version, day_start, day_r, day_t, hold, billing_code,
--    billing_since, billing_probe, minute (flat: second, r, t, ...),
--    expired (flat: charged, tokens, model, ...), extra...}

local MINUTE_S = 60
local op = ARGV[1]

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local now_us = tonumber(time[1]) * 1000000 + tonumber(time[2])
local second = math.floor(now / 1000)

-- The day holding now, among the three the caller computed.
local day_start, day_end = tonumber(ARGV[4]), tonumber(ARGV[5])
for i = 2, 6, 2 do
  local s, e = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
  if s <= now and now < e then day_start, day_end = s, e end
end

local function bump_version()
  local stored = tonumber(redis.call('GET', KEYS[7]) or '0')
  -- Time-based, so that a version key that expired can never go back.
  local version = math.max(stored + 1, now_us)
  redis.call('SET', KEYS[7], string.format('%d', version), 'PX', 2 * 86400000)
  return version
end

-- Drops seconds that left the window; answers the totals and the buckets.
local function minute_window()
  local fields = redis.call('HGETALL', KEYS[1])
  local totals = { r = 0, t = 0 }
  local buckets = {}
  for i = 1, #fields, 2 do
    local field = fields[i]
    local s = tonumber(string.sub(field, 2))
    if s <= second - MINUTE_S then
      redis.call('HDEL', KEYS[1], field)
    else
      local kind = string.sub(field, 1, 1)
      local value = tonumber(fields[i + 1])
      totals[kind] = totals[kind] + value
      buckets[s] = buckets[s] or { r = 0, t = 0 }
      buckets[s][kind] = value
    end
  end
  return totals, buckets
end

-- Today's counts; a stored day that is over counts nothing.
local function day_counts()
  local stored = redis.call('HMGET', KEYS[2], 's', 'r', 't')
  if tonumber(stored[1]) ~= day_start then return 0, 0 end
  return tonumber(stored[2] or '0'), tonumber(stored[3] or '0')
end

-- Today's hash, started afresh when the stored one is of an earlier day.
local function today()
  if tonumber(redis.call('HGET', KEYS[2], 's')) ~= day_start then
    redis.call('HSET', KEYS[2], 's', day_start, 'r', 0, 't', 0)
  end
  redis.call('PEXPIREAT', KEYS[2], day_end + 86400000)
end

local function charge_day(requests, tokens)
  today()
  redis.call('HINCRBY', KEYS[2], 'r', requests)
  redis.call('HINCRBY', KEYS[2], 't', tokens)
end

local function charge_minute(at_second, requests, tokens)
  if requests ~= 0 then redis.call('HINCRBY', KEYS[1], 'r' .. at_second, requests) end
  if tokens ~= 0 then redis.call('HINCRBY', KEYS[1], 't' .. at_second, tokens) end
  redis.call('PEXPIRE', KEYS[1], (MINUTE_S + 1) * 1000)
end

-- Removes reservations past their expiry; their estimates stay charged.
local function expire_reservations()
  local ids = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now)
  local expired = {}
  for _, id in ipairs(ids) do
    local record = redis.call('HGET', KEYS[3], id)
    if record then
      local charged, tokens, _, model = string.match(record, '^(%d+)|(%d+)|(%d)|(.*)$')
      table.insert(expired, charged)
      table.insert(expired, tokens)
      table.insert(expired, model)
      redis.call('HDEL', KEYS[3], id)
    end
  end
  if #ids > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now) end
  return expired
end

local function blocks()
  local hold = tonumber(redis.call('GET', KEYS[5]) or '0')
  local billing = redis.call('HMGET', KEYS[6], 'code', 'since', 'probe')
  return hold, billing
end

local function state(outcome, version, expired, extra)
  local _, buckets = minute_window()
  local day_r, day_t = day_counts()
  local hold, billing = blocks()
  local reply = { outcome, now, version, day_start, day_r, day_t, hold,
    billing[1] or '', tonumber(billing[2] or '0'), tonumber(billing[3] or '0') }
  local flat = {}
  for s, counts in pairs(buckets) do
    table.insert(flat, s)
    table.insert(flat, counts.r)
    table.insert(flat, counts.t)
  end
  table.insert(reply, flat)
  table.insert(reply, expired)
  for _, value in ipairs(extra or {}) do table.insert(reply, value) end
  return reply
end

local function current_version()
  return tonumber(redis.call('GET', KEYS[7]) or '0')
end

local function fits(used, cost, max)
  return used + math.max(cost, 1) <= max
end

if op == 'admit' then
  -- ARGV: 8 requests/minute, 9 requests/day, 10 tokens/minute,
  -- 11 tokens/day (-1: no limit), 12 estimated tokens, 13 reservation id,
  -- 14 reservation TTL (ms), 15 probe interval (ms), 16 model.
  local expired = expire_reservations()
  local totals = minute_window()
  local day_r, day_t = day_counts()
  local tokens = tonumber(ARGV[12])
  local checks = {
    { tonumber(ARGV[8]), totals.r, 1 },
    { tonumber(ARGV[9]), day_r, 1 },
    { tonumber(ARGV[10]), totals.t, tokens },
    { tonumber(ARGV[11]), day_t, tokens },
  }
  local admitted = 1
  for _, check in ipairs(checks) do
    local max, used, cost = check[1], check[2], check[3]
    if max >= 0 and (cost > max or not fits(used, cost, max)) then admitted = 0 end
  end
  local hold, billing = blocks()
  local probe = 0
  if billing[1] then
    if now >= tonumber(billing[3]) then probe = 1 else admitted = 0 end
  end
  if hold > now then admitted = 0 end
  local version = current_version()
  if admitted == 1 then
    charge_minute(second, 1, tokens)
    charge_day(1, tokens)
    local id, ttl = ARGV[13], tonumber(ARGV[14])
    redis.call('HSET', KEYS[3], id, now .. '|' .. tokens .. '|' .. probe .. '|' .. ARGV[16])
    redis.call('ZADD', KEYS[4], now + ttl, id)
    redis.call('PEXPIRE', KEYS[3], ttl + 60000)
    redis.call('PEXPIRE', KEYS[4], ttl + 60000)
    if probe == 1 then redis.call('HSET', KEYS[6], 'probe', now + tonumber(ARGV[15])) end
    version = bump_version()
  end
  return state(admitted, version, expired, { probe })

elseif op == 'settle' then
  -- ARGV: 8 reservation id, 9 actual tokens (-1: keep the estimate).
  -- Answers outcome 1 with the reservation (charged, tokens, probe, model)
  -- appended, or 0 when it is unknown, settled or expired.
  local expired = expire_reservations()
  local id = ARGV[8]
  local record = redis.call('HGET', KEYS[3], id)
  if not record then return state(0, current_version(), expired) end
  redis.call('HDEL', KEYS[3], id)
  redis.call('ZREM', KEYS[4], id)
  local charged, estimate, probe, model = string.match(record, '^(%d+)|(%d+)|(%d)|(.*)$')
  charged, estimate = tonumber(charged), tonumber(estimate)
  local actual = tonumber(ARGV[9])
  if actual < 0 then actual = estimate end
  local extra = math.max(actual - estimate, 0)
  local unused = math.max(estimate - actual, 0)
  -- The correction lands in the second the request was charged while that
  -- second is in the window; extra tokens beyond it are charged now.
  local charged_second = math.floor(charged / 1000)
  local field = 't' .. charged_second
  local in_window = charged_second > second - MINUTE_S
  if in_window and (unused > 0 or extra > 0) then
    local current = tonumber(redis.call('HGET', KEYS[1], field) or '0')
    redis.call('HSET', KEYS[1], field, math.max(current - unused, 0) + extra)
    redis.call('PEXPIRE', KEYS[1], (MINUTE_S + 1) * 1000)
  elseif extra > 0 then
    charge_minute(second, 0, extra)
  end
  -- Today's count gains the extra tokens, and loses the unused ones if the
  -- request was charged today.
  local _, day_t = day_counts()
  local corrected = day_t + extra
  if charged >= day_start then corrected = math.max(day_t - unused, 0) + extra end
  if corrected ~= day_t then
    today()
    redis.call('HSET', KEYS[2], 't', corrected)
  end
  local version = bump_version()
  return state(1, version, expired, { charged, estimate, probe, model, actual })

elseif op == 'count' then
  -- Calls that happened without a reservation: ARGV[8] requests and
  -- ARGV[9] tokens now, whatever the limits.
  local expired = expire_reservations()
  local requests, tokens = tonumber(ARGV[8]), tonumber(ARGV[9])
  charge_minute(second, requests, tokens)
  charge_day(requests, tokens)
  return state(1, bump_version(), expired)

elseif op == 'peek' then
  return state(1, current_version(), expire_reservations())

elseif op == 'reset' then
  -- Requests in flight keep their reservations, charged nothing from now on.
  local records = redis.call('HGETALL', KEYS[3])
  for i = 1, #records, 2 do
    local _, _, probe, model = string.match(records[i + 1], '^(%d+)|(%d+)|(%d)|(.*)$')
    redis.call('HSET', KEYS[3], records[i], now .. '|0|' .. probe .. '|' .. model)
  end
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[5], KEYS[6])
  return state(1, bump_version(), {})

elseif op == 'block' then
  -- The upstream's answers moved the blocks: ARGV[8] hold until (ms, 0:
  -- none), ARGV[9] billing code ('' to lift the block), 10 since, 11 next
  -- probe. A hold only ever extends; a billing block keeps its first
  -- `since`, and takes the next probe the caller's rules decided.
  local hold = tonumber(ARGV[8])
  if hold > tonumber(redis.call('GET', KEYS[5]) or '0') then
    redis.call('SET', KEYS[5], hold, 'PXAT', hold)
  end
  if ARGV[9] == '' then
    redis.call('DEL', KEYS[6])
  else
    local since = tonumber(redis.call('HGET', KEYS[6], 'since') or ARGV[10])
    redis.call('HSET', KEYS[6], 'code', ARGV[9], 'since', math.min(since, tonumber(ARGV[10])),
      'probe', ARGV[11])
  end
  return state(1, bump_version(), {})
end

return redis.error_reply('unknown operation ' .. tostring(op))
