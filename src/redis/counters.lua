-- quotawatch's shared counters: each workspace's minute window, calendar
-- day and upstream blocks, and the open reservations any instance may
-- settle, changed atomically. Every instance runs the same operations here, so a limit
-- holds across all of them, and every instance reads time from Redis
-- (TIME), so skewed clocks agree.
--
-- KEYS: 1 and 2 are shared by every workspace, the rest are one per
-- workspace:
--   1 reservations  HASH "workspace|reservation id" -> "charged_us|tokens|probe|model",
--                   those any instance may settle (the REST API's); the
--                   proxy's are held by the instance that admits them,
--                   which settles them itself, saying what they charged
--   2 expiries      ZSET "workspace|reservation id|record" (the field and its
--                   value), scored by when it expires (ms): the members
--                   due carry all an expiry answers, and go by rank
--   3.. state       STRING a workspace's counters as little-endian doubles:
--                a header of
--                1 version (raised by every change, never going back),
--                2 day start (ms), 3 day requests, 4 day tokens,
--                5 hold until (ms; the upstream said to wait),
--                6 newest second counted, 7 minute requests, 8 minute tokens,
--                9 billing block (0: none, else the caller's code number),
--                10 its start (ms), 11 its next probe (ms),
--                12 last reset (microseconds, to tell it from an admission in
--                the same millisecond), 13 day end (ms),
--                14 when the key expires (ms),
--                15 requests and 16 tokens of the newest second (6), which
--                go to its slot only when a newer second comes,
--                17 the version at which a slot last changed,
--              then 60 slots (second % 60) of: second, requests, tokens.
--              An operation reads the header alone (GETRANGE), the whole
--              state only when it needs a slot, and overwrites only what
--              it changed with SETRANGE: rebuilding the whole string,
--              unpacking every slot, or a hash of per-second fields cost
--              several times as much. Keeping the newest second in the
--              header makes most calls read and write the header alone:
--              the slots change about once a second.
--              A call answers a workspace's state as {base, changes}: the
--              changes are the new header followed by each slot written
--              (its index, second, requests, tokens), for the caller to
--              apply to the base, which is the state as read, or nothing
--              when the caller said it holds the slots of the version they
--              last changed at (17): then it applies them to its own copy.
--              A new state, written whole, is answered as {state, nothing}.
-- The reservations are kept together, not per workspace, so that a batch
-- of admissions writes them in one HSET and one ZADD, and one look for
-- expired ones serves every workspace: each redis.call costs the script
-- microseconds.
--
-- ARGV[1] is the operation and ARGV[2] the channel that changes are
-- announced on, as "id version" per changed workspace, comma-separated.
-- A workspace is described by its id and its day bounds (ms), one string
-- of the starts of yesterday, today, tomorrow and the day after in its
-- timezone around the caller's now: the day holding Redis's now applies,
-- so a caller whose clock is off by a little still counts into the right
-- day. The bounds are parsed only when the stored day is over.
--
-- `batch` admits and settles: ARGV[3] is how many workspaces it concerns,
-- ARGV[4] how many admissions, ARGV[5] how many settlements of recorded
-- reservations and ARGV[6] how many of held ones. Then come
-- WORKSPACE_ARGS arguments per workspace (the n-th one's state is
-- KEYS[2 + n]): its id, day bounds, requests/minute, requests/day,
-- tokens/minute, tokens/day (-1: no limit) and the version of the slots
-- the caller holds (-1: none). Then ADMISSION_ARGS per
-- admission: its workspace's number, estimated tokens, reservation id,
-- reservation TTL (ms), probe interval (ms), model, and whether to record
-- the reservation ('1') or leave it to the caller to hold ('0'). Then
-- SETTLEMENT_ARGS per settlement of a recorded reservation: its
-- workspace's number, reservation id and actual tokens (-1: keep the
-- estimate). Then HELD_SETTLEMENT_ARGS per settlement of a held one: its
-- workspace's number, when it was charged (Redis's microseconds, as
-- answered), its estimate and actual tokens (-1: keep the estimate).
-- Recording a reservation, and finding, removing or expiring it later,
-- costs the script more than all else an admission does, so what the
-- caller can hold it holds. Instances send what arrives
-- while an earlier call is on its way in one call, so that the fixed costs
-- (the call, TIME, each workspace's GET, write and announcement) are
-- shared, and what describes a workspace is sent and parsed once per call:
-- the script's time, not the network, bounds how many requests one Redis
-- takes. It answers {now (microseconds: what a held reservation was
-- charged at), outcomes, states, expired, settled}: outcomes
-- holds a byte per admission ('0' refused, '1' admitted, '2' admitted as
-- the probe of a billing block), states the state of each workspace, flat
-- (as read, changes, as read, changes, ...), and settled five values per
-- settlement of a recorded reservation: 1 if it was still open (else 0 and
-- the rest 0),
-- when it was charged (ms), the estimate charged for it, whether it was a
-- probe, its model.
--
-- The other operations concern one workspace (KEYS[3]): ARGV[3] is its id
-- and ARGV[4] its day bounds; arg(1) onwards depends on the operation.
-- They answer {outcome, now (microseconds), base, changes, expired}, the
-- base always there.
--
-- Every call first removes reservations past their expiry (their
-- estimates stay charged), some at a time, and answers them as `expired`:
-- their expiry members, "workspace|reservation id|charged (microseconds)|
-- tokens|probe|model".

local MINUTE_S = 60
local HEADER_FIELDS = 17
local HEADER = '<' .. string.rep('d', HEADER_FIELDS)
local HEADER_BYTES = 8 * HEADER_FIELDS
local SLOT = '<ddd'
local SLOT_CHANGE = '<dddd'
local SLOT_BYTES = 24
local STATE_BYTES = HEADER_BYTES + MINUTE_S * SLOT_BYTES
local WORKSPACE_ARGS = 7
local ADMISSION_ARGS = 7
local SETTLEMENT_ARGS = 3
local HELD_SETTLEMENT_ARGS = 4
-- The most expired reservations one call removes; the rest wait for the
-- next calls, so that no call takes long.
local EXPIRED_PER_CALL = 256
local RESERVATIONS, EXPIRIES = KEYS[1], KEYS[2]
local op = ARGV[1]
local channel = ARGV[2]

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local now_us = tonumber(time[1]) * 1000000 + tonumber(time[2])
local now_second = math.floor(now / 1000)
local now_text, now_us_text = string.format('%d', now), string.format('%d', now_us)

local function slot_at(at_second)
  return HEADER_BYTES + (at_second % MINUTE_S) * SLOT_BYTES + 1
end

-- The whole state as read, fetched the first time a slot is needed.
local function whole(w)
  if not w.blob then w.blob = redis.call('GET', w.state) end
  return w.blob
end

-- Slots written during this call stay in `w.slots` until `save`, so that
-- many admissions in one call rebuild the stored string once.
local function read_slot(w, at_second)
  if at_second == w.h[6] then return at_second, w.h[15], w.h[16] end
  local slot = w.slots[at_second % MINUTE_S]
  if slot then return slot[1], slot[2], slot[3] end
  local sec, requests, tokens = struct.unpack(SLOT, whole(w), slot_at(at_second))
  return sec, requests, tokens
end

local function write_slot(w, at_second, requests, tokens)
  if at_second == w.h[6] then
    w.h[15], w.h[16] = requests, tokens
    return
  end
  local index = at_second % MINUTE_S
  local slot = w.slots[index]
  if slot then
    slot[1], slot[2], slot[3] = at_second, requests, tokens
  else
    w.slots[index] = { at_second, requests, tokens }
  end
end

-- Moves the stored day to the one holding now, from the caller's bounds,
-- when it is over; a new day counts nothing yet. Only forward: should
-- Redis's clock step back past the day's start, today's count stays, as
-- zeroing it twice (now, and again when the clock returns) would let the
-- day's usage through twice.
local function roll_day(h, days)
  if now < h[13] then return end
  local bounds = {}
  for bound in string.gmatch(days, '%-?%d+') do bounds[#bounds + 1] = tonumber(bound) end
  -- Should none hold now, the caller's today applies.
  local start, finish = bounds[2], bounds[3]
  for i = 1, #bounds - 1 do
    if bounds[i] <= now and now < bounds[i + 1] then start, finish = bounds[i], bounds[i + 1] end
  end
  if h[2] ~= start then h[3], h[4] = 0, 0 end
  h[2], h[13] = start, finish
end

-- Opens a workspace: its state from KEYS[k], its id and day bounds. The
-- window slides to now: a slot holds the second it was last written for,
-- so a slot whose second is a whole minute behind is one that leaves the
-- totals.
local function open(k, id, days)
  local header = redis.call('GETRANGE', KEYS[k], 0, HEADER_BYTES - 1)
  -- A key that does not exist reads as nothing; all zero bytes are all
  -- zero doubles: an empty state, written whole.
  local new = header == ''
  local blob, changes = false, header
  if new then
    blob, changes = string.rep('\0', STATE_BYTES), ''
    header = string.sub(blob, 1, HEADER_BYTES)
  end
  local h = { struct.unpack(HEADER, header) }
  -- Every field is named here, so that the table is allocated once: each
  -- field added later would grow it. Until it is stored, the changes are
  -- the header as read.
  local w = { state = KEYS[k], id = id, slots = {}, blob = blob, new = new, changes = changes,
    h = h, slots_version = h[17], known = -1, second = 0, changed = false, requests_per_minute = -1,
    requests_per_day = -1, tokens_per_minute = -1, tokens_per_day = -1 }
  roll_day(h, days)
  -- Should Redis's clock step back, counting goes on in the newest second.
  w.second = math.max(now_second, h[6])
  if w.second - h[6] >= MINUTE_S then
    h[7], h[8] = 0, 0
  elseif w.second > h[6] then
    -- The newest second is no longer the newest: it moves to its slot.
    w.slots[h[6] % MINUTE_S] = { h[6], h[15], h[16] }
    for s = h[6] + 1, w.second do
      local sec, requests, tokens = read_slot(w, s)
      if sec == s - MINUTE_S then
        h[7] = math.max(h[7] - requests, 0)
        h[8] = math.max(h[8] - tokens, 0)
      end
    end
  end
  if w.second > h[6] then h[6], h[15], h[16] = w.second, 0, 0 end
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

local function add_day(w, requests, tokens)
  local h = w.h
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
  if w.new or next(w.slots) then h[17] = h[1] end
  local keep_until = math.max(h[13], h[5], now) + 60000
  -- A billing block lasts until a probe succeeds or an admin resets it,
  -- however many days that takes; each probe admitted stores it again.
  if h[9] > 0 then keep_until = math.max(keep_until, now + 30 * 86400000) end
  -- The expiry moves about once a day: with the day, a hold or a block.
  local expiry_moved = keep_until > h[14] or w.new
  if expiry_moved then h[14] = keep_until end
  local header = struct.pack(HEADER, unpack(h, 1, HEADER_FIELDS))
  if w.new then
    -- Written whole, once: SETRANGE would leave it short.
    local parts, at = { header }, HEADER_BYTES + 1
    for index = 0, MINUTE_S - 1 do
      local slot = w.slots[index]
      if slot then
        local start = HEADER_BYTES + index * SLOT_BYTES + 1
        parts[#parts + 1] = string.sub(w.blob, at, start - 1)
        parts[#parts + 1] = struct.pack(SLOT, slot[1], slot[2], slot[3])
        at = start + SLOT_BYTES
      end
    end
    parts[#parts + 1] = string.sub(w.blob, at)
    w.blob, w.changes = table.concat(parts), ''
    redis.call('SET', w.state, w.blob, 'PXAT', string.format('%d', h[14]))
  else
    redis.call('SETRANGE', w.state, 0, header)
    local changes = { header }
    for index, slot in pairs(w.slots) do
      redis.call('SETRANGE', w.state, HEADER_BYTES + index * SLOT_BYTES,
        struct.pack(SLOT, slot[1], slot[2], slot[3]))
      changes[#changes + 1] = struct.pack(SLOT_CHANGE, index, slot[1], slot[2], slot[3])
    end
    w.changes = table.concat(changes)
    if expiry_moved then redis.call('PEXPIREAT', w.state, string.format('%d', h[14])) end
  end
  w.slots = {}
  return w.id .. ' ' .. string.format('%d', h[1])
end

-- A workspace's state as answered, {base, changes} (see the top): the base
-- is left out when the caller holds the slots of `known`, the version they
-- last changed at before this call.
local function answer_state(w, known)
  if w.new then return w.blob, '' end
  if known == w.slots_version then return '', w.changes end
  return whole(w), w.changes
end

-- Reservations written during this call, for one HSET and one ZADD. The
-- keys they are kept in live at least a day past the newest, so that an
-- instance with a shorter reservation TTL than another's cannot expire the
-- other's reservations with them.
local new_reservations, new_expiries, keep_reservations = {}, {}, 86400000

local function save_reservations()
  if #new_reservations == 0 then return end
  redis.call('HSET', RESERVATIONS, unpack(new_reservations))
  redis.call('ZADD', EXPIRIES, unpack(new_expiries))
  -- The keys outlive their newest reservation.
  for _, key in ipairs({ RESERVATIONS, EXPIRIES }) do
    redis.call('PEXPIRE', key, string.format('%d', keep_reservations))
  end
end

-- A reservation's member of the expiries: its field and its record, which
-- is all an expiry answers (see the top).
local function expiry_member(field, record)
  return field .. '|' .. record
end

local function parse_reservation(record)
  local charged, tokens, probe, model = string.match(record, '^(%d+)|(%d+)|(%d)|(.*)$')
  return tonumber(charged), tonumber(tokens), probe, model
end

-- Removes reservations past their expiry; answers their expiry members
-- as they are, for the caller to read.
local function expire_reservations()
  local due = redis.call('ZRANGE', EXPIRIES, '-inf', now_text, 'BYSCORE', 'LIMIT', 0,
    EXPIRED_PER_CALL)
  if #due == 0 then return due end
  local fields = {}
  for i, member in ipairs(due) do fields[i] = string.match(member, '^[^|]*|[^|]*') end
  redis.call('HDEL', RESERVATIONS, unpack(fields))
  -- The members due are the lowest ranks: removed together, not looked up
  -- one by one.
  redis.call('ZREMRANGEBYRANK', EXPIRIES, 0, #due - 1)
  return due
end

local expired = expire_reservations()

-- Whether `cost` more stays within `max` (-1: no limit) after `used`.
-- A request that alone exceeds a limit never fits.
local function fits(max, used, cost)
  return max < 0 or (cost <= max and used + (cost > 1 and cost or 1) <= max)
end

-- Opens the n-th workspace of a batch, from ARGV[b..]. Its limits are
-- parsed once, for all its admissions.
local function open_in_batch(n, b)
  local w = open(2 + n, ARGV[b], ARGV[b + 1])
  w.known = tonumber(ARGV[b + 6])
  w.requests_per_minute, w.requests_per_day = tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  w.tokens_per_minute, w.tokens_per_day = tonumber(ARGV[b + 4]), tonumber(ARGV[b + 5])
  return w
end

-- Every admission's reservation expires after its TTL: the scores are
-- formatted once per TTL.
local expiry_at = {}

-- One admission, from ARGV[a..]: charges every limit or none. Answers its
-- outcome byte.
local function admit_one(w, a)
  local h = w.h
  local tokens_text = ARGV[a + 1]
  local tokens = tonumber(tokens_text)
  if not (fits(w.requests_per_minute, h[7], 1) and fits(w.requests_per_day, h[3], 1)
      and fits(w.tokens_per_minute, h[8], tokens) and fits(w.tokens_per_day, h[4], tokens)) then
    return '0'
  end
  if h[5] > now then return '0' end
  local probe = '0'
  if h[9] > 0 then
    if now < h[11] then return '0' end
    probe = '1'
    h[11] = now + tonumber(ARGV[a + 4])
  end
  add_minute(w, w.second, 1, tokens)
  add_day(w, 1, tokens)
  w.changed = true
  local outcome = probe == '1' and '2' or '1'
  -- A reservation the caller holds is not recorded (see `batch`).
  if ARGV[a + 6] ~= '1' then return outcome end
  local field = w.id .. '|' .. ARGV[a + 2]
  local record = now_us_text .. '|' .. tokens_text .. '|' .. probe .. '|' .. ARGV[a + 5]
  new_reservations[#new_reservations + 1] = field
  new_reservations[#new_reservations + 1] = record
  local ttl = ARGV[a + 3]
  local expires = expiry_at[ttl]
  if not expires then
    local ttl_ms = tonumber(ttl)
    expires = string.format('%d', now + ttl_ms)
    expiry_at[ttl] = expires
    keep_reservations = math.max(keep_reservations, 2 * ttl_ms + 60000)
  end
  new_expiries[#new_expiries + 1] = expires
  new_expiries[#new_expiries + 1] = expiry_member(field, record)
  return outcome
end

-- Settles a reservation charged at `charged_us` for `estimate` tokens:
-- the correction of its estimate by the `actual` tokens (-1: keep the
-- estimate). Answers when it was charged (ms) and the estimate charged
-- for it.
local function settle_one(w, charged_us, estimate, actual)
  -- A reset since the admission charged nothing of it from then on, so
  -- the estimate it keeps is nothing too.
  local since_reset = charged_us < w.h[12]
  local charged = math.floor(math.max(charged_us, w.h[12]) / 1000)
  local charged_estimate = since_reset and 0 or estimate
  if actual < 0 then actual = charged_estimate end
  -- The correction lands in the second the request was charged while that
  -- second is in the window; extra tokens beyond it are charged now.
  local correction = actual - charged_estimate
  local charged_second = math.floor(charged / 1000)
  if charged_second > w.second - MINUTE_S and read_slot(w, charged_second) == charged_second then
    add_minute(w, charged_second, 0, correction)
  elseif correction > 0 then
    add_minute(w, w.second, 0, correction)
  end
  -- Today's count gains the extra tokens, and loses the unused ones if the
  -- request was charged today.
  if charged < w.h[2] then correction = math.max(correction, 0) end
  if correction ~= 0 then add_day(w, 0, correction) end
  w.changed = true
  return charged, charged_estimate
end

-- Settles the batch's settlements, from ARGV[s..]; answers them flat (see
-- `batch`). Their records are read, and removed, together.
local function settle_all(workspaces, s, count)
  local settled = {}
  if count == 0 then return settled end
  local fields = {}
  for j = 1, count do
    local b = s + (j - 1) * SETTLEMENT_ARGS
    fields[j] = workspaces[tonumber(ARGV[b])].id .. '|' .. ARGV[b + 1]
  end
  local records = redis.call('HMGET', RESERVATIONS, unpack(fields))
  local done, members = {}, {}
  for j = 1, count do
    local b = s + (j - 1) * SETTLEMENT_ARGS
    local field, record = fields[j], records[j]
    -- A reservation named twice settles once.
    if record and not done[field] then
      done[field] = true
      done[#done + 1] = field
      members[#members + 1] = expiry_member(field, record)
      local charged_us, estimate, probe, model = parse_reservation(record)
      local charged, charged_estimate =
        settle_one(workspaces[tonumber(ARGV[b])], charged_us, estimate, tonumber(ARGV[b + 2]))
      for _, value in ipairs({ 1, charged, charged_estimate, tonumber(probe), model }) do
        settled[#settled + 1] = value
      end
    else
      for _ = 1, 5 do settled[#settled + 1] = 0 end
    end
  end
  if #done > 0 then
    redis.call('HDEL', RESERVATIONS, unpack(done))
    redis.call('ZREM', EXPIRIES, unpack(members))
  end
  return settled
end

-- Settles the batch's held reservations, from ARGV[s..]: the caller says
-- what each charged, and answers for itself that it settles once.
local function settle_held(workspaces, s, count)
  for j = 1, count do
    local b = s + (j - 1) * HELD_SETTLEMENT_ARGS
    settle_one(workspaces[tonumber(ARGV[b])], tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]),
      tonumber(ARGV[b + 3]))
  end
end

if op == 'batch' then
  local count, admissions = tonumber(ARGV[3]), tonumber(ARGV[4])
  local settlements, held_settlements = tonumber(ARGV[5]), tonumber(ARGV[6])
  local workspaces = {}
  for n = 1, count do
    workspaces[n] = open_in_batch(n, 7 + (n - 1) * WORKSPACE_ARGS)
  end
  local a = 7 + count * WORKSPACE_ARGS
  -- Settlements first: what they give back is there for the admissions.
  local s = a + admissions * ADMISSION_ARGS
  local settled = settle_all(workspaces, s, settlements)
  settle_held(workspaces, s + settlements * SETTLEMENT_ARGS, held_settlements)
  local outcomes = {}
  for j = 1, admissions do
    outcomes[j] = admit_one(workspaces[tonumber(ARGV[a])], a)
    a = a + ADMISSION_ARGS
  end
  local states, announcements = {}, {}
  for n = 1, count do
    local w = workspaces[n]
    if w.changed then announcements[#announcements + 1] = stored(w) end
    states[2 * n - 1], states[2 * n] = answer_state(w, w.known)
  end
  save_reservations()
  -- One announcement for the whole call.
  if #announcements > 0 then
    redis.call('PUBLISH', channel, table.concat(announcements, ','))
  end
  return { now_us, table.concat(outcomes), states, expired, settled }
end

-- The operations on one workspace.
local w = open(3, ARGV[3], ARGV[4])
local function arg(i) return ARGV[4 + i] end

local function save()
  redis.call('PUBLISH', channel, stored(w))
end

local function reply(outcome)
  local base, changes = answer_state(w, -1)
  return { outcome, now_us, base, changes, expired }
end

if op == 'count' then
  -- Calls that happened without a reservation: arg(1) requests and
  -- arg(2) tokens now, whatever the limits.
  local requests, tokens = tonumber(arg(1)), tonumber(arg(2))
  add_minute(w, w.second, requests, tokens)
  add_day(w, requests, tokens)
  save()
  return reply(1)

elseif op == 'peek' then
  return reply(1)

elseif op == 'reset' or op == 'reset_usage' then
  -- Requests in flight keep their reservations, charged nothing from the
  -- reset on (see `settle`). `reset_usage` keeps the blocks (5, 9-11).
  local h = w.h
  local fresh = { struct.unpack(HEADER, string.rep('\0', HEADER_BYTES)) }
  fresh[1], fresh[2], fresh[6], fresh[12], fresh[13] = h[1], h[2], w.second, now_us, h[13]
  if op == 'reset_usage' then
    fresh[5], fresh[9], fresh[10], fresh[11] = h[5], h[9], h[10], h[11]
  end
  w.h = fresh
  w.blob, w.new = string.rep('\0', STATE_BYTES), true
  w.slots = {}
  save()
  return reply(1)

elseif op == 'lift' then
  -- An admin lifts the upstream's blocks; the counts stay.
  local h = w.h
  h[5], h[9], h[10], h[11] = 0, 0, 0, 0
  save()
  return reply(1)

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
  return reply(1)
end

return redis.error_reply('unknown operation ' .. tostring(op))
