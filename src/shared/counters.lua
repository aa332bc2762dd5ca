-- quotawatch's shared counters: each workspace's minute window, calendar
-- day, reservations and upstream blocks, changed atomically. Every instance
-- runs the same operations here, so a limit holds across all of them, and
-- every instance reads time from Redis (TIME), so skewed clocks agree.
--
-- KEYS, three per workspace (for one workspace, all in one cluster slot):
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
-- ARGV[1] is the operation and ARGV[2] the channel that changes are
-- announced on, as "id version" per changed workspace, comma-separated.
--
-- `admit` takes a batch: ARGV[3] is how many admissions follow, each as
-- ADMISSION_ARGS arguments (see `admit_one`). Instances send the
-- admissions that arrive while an earlier call is on its way in one call,
-- so that the fixed costs (the call, TIME, each workspace's GET, SET and
-- announcement) are shared: every redis.call inside a script costs
-- microseconds. It answers {now, {outcome, probe} per admission,
-- {KEYS index, state, expired} per workspace}.
--
-- The other operations concern one workspace (KEYS[1..3]): ARGV[3..8] are
-- its day bounds (ms) around the caller's now (yesterday, today and
-- tomorrow in its timezone; the one holding Redis's now applies) and
-- ARGV[9] its id; arg(1) onwards depends on the operation. They answer
-- {outcome, now, state (as stored), expired (flat: charged, tokens, model,
-- ...), extra...}.
--
-- Housekeeping is rationed through the header: expired reservations are
-- looked for at most once a second, and the reservation keys' expiry is
-- pushed out once per TTL.

local MINUTE_S = 60
local HEADER_FIELDS = 13
local HEADER = '<' .. string.rep('d', HEADER_FIELDS)
local HEADER_BYTES = 8 * HEADER_FIELDS
local SLOT = '<ddd'
local SLOT_BYTES = 24
local STATE_BYTES = HEADER_BYTES + MINUTE_S * SLOT_BYTES
local ADMISSION_ARGS = 17
local op = ARGV[1]
local channel = ARGV[2]

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local now_us = tonumber(time[1]) * 1000000 + tonumber(time[2])

local function slot_at(at_second)
  return HEADER_BYTES + (at_second % MINUTE_S) * SLOT_BYTES + 1
end

-- Slots written during this call stay in `w.slots` until `save`, so that
-- many admissions in one call rebuild the stored string once.
local function read_slot(w, at_second)
  local slot = w.slots[at_second % MINUTE_S]
  if slot then return slot[1], slot[2], slot[3] end
  local sec, requests, tokens = struct.unpack(SLOT, w.blob, slot_at(at_second))
  return sec, requests, tokens
end

local function write_slot(w, at_second, requests, tokens)
  w.slots[at_second % MINUTE_S] = { at_second, requests, tokens }
end

-- Opens a workspace: its keys from KEYS[k], its id, and its day bounds from
-- ARGV[b..b+5], of which the day holding now applies. The window slides to
-- now: a slot holds the second it was last written for, so a slot whose
-- second is a whole minute behind is one that leaves the totals.
local function open(k, id, b)
  local w = { state = KEYS[k], res = KEYS[k + 1], exp = KEYS[k + 2], id = id, slots = {},
    reservations = {}, expiries = {} }
  w.day_start, w.day_end = tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  for i = b, b + 4, 2 do
    local s, e = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
    if s <= now and now < e then w.day_start, w.day_end = s, e end
  end
  -- All zero bytes are all zero doubles: an empty state.
  w.blob = redis.call('GET', w.state) or string.rep('\0', STATE_BYTES)
  local h = { struct.unpack(HEADER, w.blob) }
  w.h = h
  -- Should Redis's clock step back, counting goes on in the newest second.
  w.second = math.max(math.floor(now / 1000), h[6])
  if w.second - h[6] >= MINUTE_S then
    h[7], h[8] = 0, 0
  else
    for s = h[6] + 1, w.second do
      local sec, requests, tokens = read_slot(w, s)
      if sec == s - MINUTE_S then
        h[7] = math.max(h[7] - requests, 0)
        h[8] = math.max(h[8] - tokens, 0)
      end
    end
  end
  h[6] = w.second
  return w
end

-- Adds to the bucket of `at_second`, unless that second left the window.
local function add_minute(w, at_second, requests, tokens)
  if at_second <= w.second - MINUTE_S then return end
  local sec, old_requests, old_tokens = read_slot(w, at_second)
  if sec ~= at_second then
    if sec > at_second then return end
    old_requests, old_tokens = 0, 0
  end
  local new_requests = math.max(old_requests + requests, 0)
  local new_tokens = math.max(old_tokens + tokens, 0)
  w.h[7] = w.h[7] + new_requests - old_requests
  w.h[8] = w.h[8] + new_tokens - old_tokens
  write_slot(w, at_second, new_requests, new_tokens)
end

-- Today's counts; a stored day that is over counts nothing.
local function day_counts(w)
  if w.h[2] ~= w.day_start then return 0, 0 end
  return w.h[3], w.h[4]
end

local function add_day(w, requests, tokens)
  local h = w.h
  if h[2] ~= w.day_start then h[2], h[3], h[4] = w.day_start, 0, 0 end
  h[3] = math.max(h[3] + requests, 0)
  h[4] = math.max(h[4] + tokens, 0)
end

-- Stores the state with a new version and keeps it for as long as any of
-- it counts: the day, or a hold beyond it. Answers the announcement of the
-- change, "id version"; other instances reload the workspace when they hear
-- of a version newer than theirs. Published from here, it costs no extra
-- round trip.
local function stored(w)
  local h = w.h
  h[1] = math.max(h[1] + 1, now_us)
  local parts, at = { struct.pack(HEADER, unpack(h, 1, HEADER_FIELDS)) }, HEADER_BYTES + 1
  for index = 0, MINUTE_S - 1 do
    local slot = w.slots[index]
    if slot then
      local start = HEADER_BYTES + index * SLOT_BYTES + 1
      table.insert(parts, string.sub(w.blob, at, start - 1))
      table.insert(parts, struct.pack(SLOT, slot[1], slot[2], slot[3]))
      at = start + SLOT_BYTES
    end
  end
  table.insert(parts, string.sub(w.blob, at))
  w.blob = table.concat(parts)
  w.slots = {}
  if #w.reservations > 0 then
    redis.call('HSET', w.res, unpack(w.reservations))
    redis.call('ZADD', w.exp, unpack(w.expiries))
    w.reservations, w.expiries = {}, {}
  end
  if w.keys_expire then
    redis.call('PEXPIREAT', w.res, h[12])
    redis.call('PEXPIREAT', w.exp, h[12])
    w.keys_expire = false
  end
  local keep = math.max(w.day_end, h[5]) - now + 60000
  -- A billing block lasts until a probe succeeds or an admin resets it,
  -- however many days that takes; each probe admitted stores it again.
  if h[9] > 0 then keep = math.max(keep, 30 * 86400000) end
  redis.call('SET', w.state, w.blob, 'PX', keep)
  return w.id .. ' ' .. string.format('%d', h[1])
end

local function parse_reservation(record)
  local charged, tokens, probe, model = string.match(record, '^(%d+)|(%d+)|(%d)|(.*)$')
  return tonumber(charged), tonumber(tokens), probe, model
end

-- Removes reservations past their expiry (their estimates stay charged),
-- at most once a second unless `always`.
local function expire_reservations(w, always)
  if not always and now < w.h[13] then return {} end
  w.h[13] = now + 1000
  local ids = redis.call('ZRANGEBYSCORE', w.exp, '-inf', now)
  local expired = {}
  for _, id in ipairs(ids) do
    local record = redis.call('HGET', w.res, id)
    if record then
      local charged, tokens, _, model = parse_reservation(record)
      table.insert(expired, charged)
      table.insert(expired, tokens)
      table.insert(expired, model)
      redis.call('HDEL', w.res, id)
    end
  end
  if #ids > 0 then redis.call('ZREMRANGEBYSCORE', w.exp, '-inf', now) end
  return expired
end

local function fits(used, cost, max)
  return used + math.max(cost, 1) <= max
end

-- One admission, from ARGV[a..a+ADMISSION_ARGS-1]: KEYS index, day bounds
-- (6), workspace id, requests/minute, requests/day, tokens/minute,
-- tokens/day (-1: no limit), estimated tokens, reservation id, reservation
-- TTL (ms), probe interval (ms), model. Charges every limit or none.
local function admit_one(w, a)
  local h = w.h
  local tokens = tonumber(ARGV[a + 12])
  local day_r, day_t = day_counts(w)
  local checks = {
    { tonumber(ARGV[a + 8]), h[7], 1 },
    { tonumber(ARGV[a + 9]), day_r, 1 },
    { tonumber(ARGV[a + 10]), h[8], tokens },
    { tonumber(ARGV[a + 11]), day_t, tokens },
  }
  for _, check in ipairs(checks) do
    local max, used, cost = check[1], check[2], check[3]
    if max >= 0 and (cost > max or not fits(used, cost, max)) then return 0, 0 end
  end
  if h[5] > now then return 0, 0 end
  local probe = 0
  if h[9] > 0 then
    if now < h[11] then return 0, 0 end
    probe = 1
    h[11] = now + tonumber(ARGV[a + 15])
  end
  add_minute(w, w.second, 1, tokens)
  add_day(w, 1, tokens)
  local id, ttl = ARGV[a + 13], tonumber(ARGV[a + 14])
  -- Written with the state, in one HSET and one ZADD per workspace.
  table.insert(w.reservations, id)
  table.insert(w.reservations, now .. '|' .. tokens .. '|' .. probe .. '|' .. ARGV[a + 16])
  table.insert(w.expiries, now + ttl)
  table.insert(w.expiries, id)
  -- The keys outlive their newest reservation by up to one TTL more.
  if h[12] < now + ttl + 60000 then
    h[12] = now + 2 * ttl + 60000
    w.keys_expire = true
  end
  w.changed = true
  return 1, probe
end

if op == 'admit' then
  local workspaces, opened = {}, {}
  local outcomes = {}
  for j = 1, tonumber(ARGV[3]) do
    local a = 4 + (j - 1) * ADMISSION_ARGS
    local k = tonumber(ARGV[a])
    local w = workspaces[k]
    if not w then
      w = open(k, ARGV[a + 7], a + 1)
      w.expired = expire_reservations(w)
      workspaces[k] = w
      table.insert(opened, k)
    end
    local admitted, probe = admit_one(w, a)
    table.insert(outcomes, { admitted, probe })
  end
  local states, announcements = {}, {}
  for _, k in ipairs(opened) do
    local w = workspaces[k]
    if w.changed then table.insert(announcements, stored(w)) end
    table.insert(states, { k, w.blob, w.expired })
  end
  -- One announcement for the whole call.
  if #announcements > 0 then
    redis.call('PUBLISH', channel, table.concat(announcements, ','))
  end
  return { now, outcomes, states }
end

-- The operations on one workspace.
local w = open(1, ARGV[9], 3)
local function arg(i) return ARGV[9 + i] end

local function save()
  redis.call('PUBLISH', channel, stored(w))
end

-- The stored state goes back as it is; the caller reads the same layout.
local function reply(outcome, expired, extra)
  local answer = { outcome, now, w.blob, expired }
  for _, value in ipairs(extra or {}) do table.insert(answer, value) end
  return answer
end

if op == 'settle' then
  -- arg: 1 reservation id, 2 actual tokens (-1: keep the estimate).
  -- Answers outcome 1 with the reservation (charged, tokens, probe, model)
  -- appended, or 0 when it is unknown, settled or expired.
  local expired = expire_reservations(w)
  local id = arg(1)
  local record = redis.call('HGET', w.res, id)
  if not record then return reply(0, expired) end
  redis.call('HDEL', w.res, id)
  redis.call('ZREM', w.exp, id)
  local charged, estimate, probe, model = parse_reservation(record)
  local actual = tonumber(arg(2))
  if actual < 0 then actual = estimate end
  -- The correction lands in the second the request was charged while that
  -- second is in the window; extra tokens beyond it are charged now.
  local charged_second = math.floor(charged / 1000)
  if charged_second > w.second - MINUTE_S and read_slot(w, charged_second) == charged_second then
    add_minute(w, charged_second, 0, actual - estimate)
  elseif actual > estimate then
    add_minute(w, w.second, 0, actual - estimate)
  end
  -- Today's count gains the extra tokens, and loses the unused ones if the
  -- request was charged today.
  local correction = actual - estimate
  if charged < w.day_start then correction = math.max(correction, 0) end
  if correction ~= 0 then add_day(w, 0, correction) end
  save()
  return reply(1, expired, { charged, estimate, probe, model, actual })

elseif op == 'count' then
  -- Calls that happened without a reservation: arg(1) requests and
  -- arg(2) tokens now, whatever the limits.
  local expired = expire_reservations(w)
  local requests, tokens = tonumber(arg(1)), tonumber(arg(2))
  add_minute(w, w.second, requests, tokens)
  add_day(w, requests, tokens)
  save()
  return reply(1, expired)

elseif op == 'peek' then
  return reply(1, expire_reservations(w, true))

elseif op == 'reset' then
  -- Requests in flight keep their reservations, charged nothing from now on.
  local records = redis.call('HGETALL', w.res)
  for i = 1, #records, 2 do
    local _, _, probe, model = parse_reservation(records[i + 1])
    redis.call('HSET', w.res, records[i], now .. '|0|' .. probe .. '|' .. model)
  end
  local version, keys_expire_at = w.h[1], w.h[12]
  w.blob = string.rep('\0', STATE_BYTES)
  w.slots = {}
  w.h = { struct.unpack(HEADER, w.blob) }
  w.h[1], w.h[6], w.h[12] = version, w.second, keys_expire_at
  save()
  return reply(1, {})

elseif op == 'block' then
  -- The upstream's answers moved the blocks. arg(1): hold until (ms; 0 for
  -- no change); a hold only ever extends. arg(2): the billing block's
  -- change: -1 none; a code number to set it (3 since, 4 next probe), which
  -- keeps the first `since` and takes the next probe the caller's rules
  -- decided; 0 to lift it, only if it is still the block that started at
  -- arg(3), so that a late lift cannot undo a newer block.
  local h = w.h
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
