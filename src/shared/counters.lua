-- quotawatch's shared counters: one workspace's minute window, calendar
-- day, reservations and upstream blocks, changed atomically. Every instance
-- runs the same operations here, so a limit holds across all of them, and
-- every instance reads time from Redis (TIME), so skewed clocks agree.
--
-- KEYS (one workspace, all in one cluster hash slot):
--   1 state    STRING the counters as little-endian doubles: a header of
--                1 version (raised by every change, never going back),
--                2 day start (ms), 3 day requests, 4 day tokens,
--                5 hold until (ms; the upstream said to wait),
--                6 newest second counted, 7 minute requests, 8 minute tokens,
--                9 billing block (0: none, else the caller's code number),
--                10 its start (ms), 11 its next probe (ms),
--                12 when the reservation keys expire (ms),
--                13 when expired reservations are next looked for (ms),
--              then 60 slots (second % 60) of: second, requests, tokens.
--              An operation reads the header and the slots it touches, and
--              writes them back in place: one GET and one SET whatever the
--              traffic, without unpacking the whole window (a hash of
--              per-second fields, or unpacking every slot, cost several
--              times as much).
--   2 res      HASH  reservation id -> "charged_ms|tokens|probe|model"
--   3 expiry   ZSET  reservation id scored by when it expires (ms)
--
-- ARGV[1] is the operation; ARGV[2..7] are the day bounds (ms) around the
-- caller's now: yesterday, today and tomorrow in the workspace's timezone,
-- of which the one holding Redis's now applies; ARGV[8] is the channel
-- that changes are announced on and ARGV[9] the workspace's id. The rest,
-- arg(1) onwards, depends on the operation (see each branch below).
--
-- Every operation answers the state after it:
--   {outcome, now, state (as stored), expired (flat: charged, tokens,
--    model, ...), extra...}
--
-- An admission makes six Redis calls (TIME, GET, HSET, ZADD, SET, PUBLISH):
-- each costs microseconds inside a script, so housekeeping is rationed
-- through the header: expired reservations are looked for at most once a
-- second, and the reservation keys' expiry is pushed out once per TTL.

local MINUTE_S = 60
local HEADER_FIELDS = 13
local HEADER = '<' .. string.rep('d', HEADER_FIELDS)
local HEADER_BYTES = 8 * HEADER_FIELDS
local SLOT = '<ddd'
local SLOT_BYTES = 24
local STATE_BYTES = HEADER_BYTES + MINUTE_S * SLOT_BYTES
local op = ARGV[1]
local function arg(i) return ARGV[9 + i] end

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local now_us = tonumber(time[1]) * 1000000 + tonumber(time[2])

-- The day holding now, among the three the caller computed.
local day_start, day_end = tonumber(ARGV[4]), tonumber(ARGV[5])
for i = 2, 6, 2 do
  local s, e = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
  if s <= now and now < e then day_start, day_end = s, e end
end

-- All zero bytes are all zero doubles: an empty state.
local blob = redis.call('GET', KEYS[1]) or string.rep('\0', STATE_BYTES)
local h = { struct.unpack(HEADER, blob) }
-- Should Redis's clock step back, counting goes on in the newest second.
local second = math.max(math.floor(now / 1000), h[6])

local function slot_at(at_second)
  return HEADER_BYTES + (at_second % MINUTE_S) * SLOT_BYTES + 1
end

local function read_slot(at_second)
  local sec, requests, tokens = struct.unpack(SLOT, blob, slot_at(at_second))
  return sec, requests, tokens
end

local function write_slot(at_second, requests, tokens)
  local at = slot_at(at_second)
  blob = string.sub(blob, 1, at - 1) .. struct.pack(SLOT, at_second, requests, tokens)
    .. string.sub(blob, at + SLOT_BYTES)
end

-- Slides the window to `second`: seconds that leave it leave the totals.
-- A slot holds the second it was last written for, so a slot whose second
-- is a whole minute behind is one that leaves now.
if second - h[6] >= MINUTE_S then
  h[7], h[8] = 0, 0
else
  for s = h[6] + 1, second do
    local sec, requests, tokens = read_slot(s)
    if sec == s - MINUTE_S then
      h[7] = math.max(h[7] - requests, 0)
      h[8] = math.max(h[8] - tokens, 0)
    end
  end
end
h[6] = second

-- Adds to the bucket of `at_second`, unless that second left the window.
local function add_minute(at_second, requests, tokens)
  if at_second <= second - MINUTE_S then return end
  local sec, old_requests, old_tokens = read_slot(at_second)
  if sec ~= at_second then
    if sec > at_second then return end
    old_requests, old_tokens = 0, 0
  end
  local new_requests = math.max(old_requests + requests, 0)
  local new_tokens = math.max(old_tokens + tokens, 0)
  h[7] = h[7] + new_requests - old_requests
  h[8] = h[8] + new_tokens - old_tokens
  write_slot(at_second, new_requests, new_tokens)
end

-- Today's counts; a stored day that is over counts nothing.
local function day_counts()
  if h[2] ~= day_start then return 0, 0 end
  return h[3], h[4]
end

local function add_day(requests, tokens)
  if h[2] ~= day_start then h[2], h[3], h[4] = day_start, 0, 0 end
  h[3] = math.max(h[3] + requests, 0)
  h[4] = math.max(h[4] + tokens, 0)
end

-- Stores the state with a new version, announces the change, and keeps it
-- for as long as any of it counts: the day, or a hold beyond it.
local function save()
  h[1] = math.max(h[1] + 1, now_us)
  blob = struct.pack(HEADER, unpack(h, 1, HEADER_FIELDS)) .. string.sub(blob, HEADER_BYTES + 1)
  local keep = math.max(day_end, h[5]) - now + 60000
  -- A billing block lasts until a probe succeeds or an admin resets it,
  -- however many days that takes; each probe admitted stores it again.
  if h[9] > 0 then keep = math.max(keep, 30 * 86400000) end
  redis.call('SET', KEYS[1], blob, 'PX', keep)
  -- Other instances reload the workspace when they hear of a version newer
  -- than theirs; published from here, it costs no extra round trip.
  redis.call('PUBLISH', ARGV[8], ARGV[9] .. ' ' .. string.format('%d', h[1]))
end

local function parse_reservation(record)
  local charged, tokens, probe, model = string.match(record, '^(%d+)|(%d+)|(%d)|(.*)$')
  return tonumber(charged), tonumber(tokens), probe, model
end

-- Removes reservations past their expiry (their estimates stay charged),
-- at most once a second unless `always`.
local function expire_reservations(always)
  if not always and now < h[13] then return {} end
  h[13] = now + 1000
  local ids = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
  local expired = {}
  for _, id in ipairs(ids) do
    local record = redis.call('HGET', KEYS[2], id)
    if record then
      local charged, tokens, _, model = parse_reservation(record)
      table.insert(expired, charged)
      table.insert(expired, tokens)
      table.insert(expired, model)
      redis.call('HDEL', KEYS[2], id)
    end
  end
  if #ids > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now) end
  return expired
end

-- The stored state goes back as it is; the caller reads the same layout.
local function reply(outcome, expired, extra)
  local answer = { outcome, now, blob, expired }
  for _, value in ipairs(extra or {}) do table.insert(answer, value) end
  return answer
end

local function fits(used, cost, max)
  return used + math.max(cost, 1) <= max
end

if op == 'admit' then
  -- arg: 1 requests/minute, 2 requests/day, 3 tokens/minute,
  -- 4 tokens/day (-1: no limit), 5 estimated tokens, 6 reservation id,
  -- 7 reservation TTL (ms), 8 probe interval (ms), 9 model.
  local expired = expire_reservations()
  local minute_r, minute_t = h[7], h[8]
  local day_r, day_t = day_counts()
  local tokens = tonumber(arg(5))
  local checks = {
    { tonumber(arg(1)), minute_r, 1 },
    { tonumber(arg(2)), day_r, 1 },
    { tonumber(arg(3)), minute_t, tokens },
    { tonumber(arg(4)), day_t, tokens },
  }
  local admitted = 1
  for _, check in ipairs(checks) do
    local max, used, cost = check[1], check[2], check[3]
    if max >= 0 and (cost > max or not fits(used, cost, max)) then admitted = 0 end
  end
  local probe = 0
  if h[9] > 0 then
    if now >= h[11] then probe = 1 else admitted = 0 end
  end
  if h[5] > now then admitted = 0 end
  if admitted == 1 then
    add_minute(second, 1, tokens)
    add_day(1, tokens)
    local id, ttl = arg(6), tonumber(arg(7))
    redis.call('HSET', KEYS[2], id, now .. '|' .. tokens .. '|' .. probe .. '|' .. arg(9))
    redis.call('ZADD', KEYS[3], now + ttl, id)
    -- The keys outlive their newest reservation by up to one TTL more.
    if h[12] < now + ttl + 60000 then
      h[12] = now + 2 * ttl + 60000
      redis.call('PEXPIREAT', KEYS[2], h[12])
      redis.call('PEXPIREAT', KEYS[3], h[12])
    end
    if probe == 1 then h[11] = now + tonumber(arg(8)) end
    save()
  end
  return reply(admitted, expired, { probe })

elseif op == 'settle' then
  -- arg: 1 reservation id, 2 actual tokens (-1: keep the estimate).
  -- Answers outcome 1 with the reservation (charged, tokens, probe, model)
  -- appended, or 0 when it is unknown, settled or expired.
  local expired = expire_reservations()
  local id = arg(1)
  local record = redis.call('HGET', KEYS[2], id)
  if not record then return reply(0, expired) end
  redis.call('HDEL', KEYS[2], id)
  redis.call('ZREM', KEYS[3], id)
  local charged, estimate, probe, model = parse_reservation(record)
  local actual = tonumber(arg(2))
  if actual < 0 then actual = estimate end
  -- The correction lands in the second the request was charged while that
  -- second is in the window; extra tokens beyond it are charged now.
  local charged_second = math.floor(charged / 1000)
  if charged_second > second - MINUTE_S and read_slot(charged_second) == charged_second then
    add_minute(charged_second, 0, actual - estimate)
  elseif actual > estimate then
    add_minute(second, 0, actual - estimate)
  end
  -- Today's count gains the extra tokens, and loses the unused ones if the
  -- request was charged today.
  local correction = actual - estimate
  if charged < day_start then correction = math.max(correction, 0) end
  if correction ~= 0 then add_day(0, correction) end
  save()
  return reply(1, expired, { charged, estimate, probe, model, actual })

elseif op == 'count' then
  -- Calls that happened without a reservation: arg(1) requests and
  -- arg(2) tokens now, whatever the limits.
  local expired = expire_reservations()
  local requests, tokens = tonumber(arg(1)), tonumber(arg(2))
  add_minute(second, requests, tokens)
  add_day(requests, tokens)
  save()
  return reply(1, expired)

elseif op == 'peek' then
  return reply(1, expire_reservations(true))

elseif op == 'reset' then
  -- Requests in flight keep their reservations, charged nothing from now on.
  local records = redis.call('HGETALL', KEYS[2])
  for i = 1, #records, 2 do
    local _, _, probe, model = parse_reservation(records[i + 1])
    redis.call('HSET', KEYS[2], records[i], now .. '|0|' .. probe .. '|' .. model)
  end
  local version, keys_expire_at = h[1], h[12]
  blob = string.rep('\0', STATE_BYTES)
  h = { struct.unpack(HEADER, blob) }
  h[1], h[6], h[12] = version, second, keys_expire_at
  save()
  return reply(1, {})

elseif op == 'block' then
  -- The upstream's answers moved the blocks. arg(1): hold until (ms; 0 for
  -- no change); a hold only ever extends. arg(2): the billing block's
  -- change: -1 none; a code number to set it (3 since, 4 next probe), which
  -- keeps the first `since` and takes the next probe the caller's rules
  -- decided; 0 to lift it, only if it is still the block that started at
  -- arg(3), so that a late lift cannot undo a newer block.
  h[5] = math.max(h[5], tonumber(arg(1)))
  local code, since = tonumber(arg(2)), tonumber(arg(3))
  if code == 0 then
    if h[10] == since then h[9], h[10], h[11] = 0, 0, 0 end
  elseif code > 0 then
    if h[9] > 0 then since = math.min(since, h[10]) end
    h[9], h[10], h[11] = code, since, tonumber(arg(4))
  end
  save()
  return reply(1, {})
end

return redis.error_reply('unknown operation ' .. tostring(op))
