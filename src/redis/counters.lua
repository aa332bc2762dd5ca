-- quotawatch's shared counters: each workspace's minute window, calendar
-- day and upstream blocks, and the open reservations any instance may
-- settle, changed atomically. Every instance runs the same operations here, so a limit
-- holds across all of them, and every instance reads time from Redis
-- (TIME), so skewed clocks agree.
--
-- This is a function library (Redis 7's FUNCTION): its top level runs once,
-- when Redis loads it, and defines the helpers; Redis then calls
-- `counters` (registered at the end under the name the instance gives it,
-- @FUNCTION@) for each call, with KEYS and ARGV as below. Run as a script,
-- the top level would run at every call, and making the helpers cost more
-- than a small call's own work. What a call works on (its keys, arguments,
-- Redis's time, what it gathers to write at its end) lives in the locals
-- declared before the helpers, which `counters` sets as it starts.
--
-- KEYS: 1 and 2 are shared by every workspace, the rest are one per
-- workspace:
--   1 reservations  HASH "workspace|reservation id" -> "charged_us|estimate|probe|model"
--                   (then "|" and the scope counters it charged, if any: see
--                   `open_scope`),
--                   those any instance may settle (the REST API's); the
--                   proxy's are held by the instance that admits them,
--                   which settles them itself, saying what they charged
--   2 expiries      ZSET "workspace|reservation id|record" (the field and its
--                   value), scored by when it expires (ms): the members
--                   due carry all an expiry answers, and go by rank
--   3.. state       STRING a workspace's counters as little-endian doubles:
--                a header of
--                1 version (raised by every change, never going back),
--                2 hold until (ms; the upstream said to wait),
--                3 billing block (0: none, else the caller's code number),
--                4 its start (ms), 5 its next probe (ms),
--                6 last reset (microseconds, to tell it from an admission in
--                the same millisecond), 7 when the key expires (ms),
--                8 the version at which a slot last changed,
--                9 the newest second counted,
--                then the newest second's count of each metric, which go
--                to its slot only when a newer second comes,
--                then the total of each window and metric, window by window
--                (the minute, then each calendar period: day, month), metric
--                by metric (requests, tokens),
--                then each calendar period's start and end (ms);
--              then 60 slots (second % 60) of: second, the count of each
--              metric.
--              The layout follows METRICS and WINDOWS below, which match
--              `Metric::ALL` and `Window::ALL` (`state.rs` reads it
--              likewise), so a limit is data: a metric and a window indexing
--              the totals, never a field of its own.
--              An operation reads the header alone (GETRANGE), the whole
--              state only when it needs a slot, and overwrites only what
--              it changed with SETRANGE: rebuilding the whole string,
--              unpacking every slot, or a hash of per-second fields cost
--              several times as much. Keeping the newest second in the
--              header makes most calls read and write the header alone:
--              the slots change about once a second.
--              A call answers a workspace's state as {base, changes}: the
--              changes are the new header followed by each slot written
--              (its index, then the slot), for the caller to
--              apply to the base, which is the state as read, or nothing
--              when the caller said it holds the slots of the version they
--              last changed at (8): then it applies them to its own copy.
--              A new state, written whole, is answered as {state, nothing}.
-- The reservations are kept together, not per workspace, so that a batch
-- of admissions writes them in one HSET and one ZADD, and one look for
-- expired ones serves every workspace: each redis.call costs the script
-- microseconds.
--
-- ARGV[1] is the operation and ARGV[2] the channel that changes are
-- announced on, as "id version" per changed workspace, comma-separated.
-- A workspace is described by its id and its calendar bounds (ms): for
-- each calendar period (day, month) the starts of the one before, the
-- current one, the next and the one after in its timezone around the
-- caller's now, periods separated by '|': the period holding Redis's now
-- applies, so a caller whose clock is off by a little still counts into the
-- right day and month. The bounds are parsed only when a stored period is
-- over.
--
-- `batch` admits and settles: ARGV[3] is how many workspaces it concerns,
-- ARGV[4] how many admissions, ARGV[5] how many settlements of recorded
-- reservations and ARGV[6] how many of held ones. Then come
-- WORKSPACE_ARGS arguments per workspace (the n-th one's state is
-- KEYS[2 + n]): its id, calendar bounds, limits and the version of the
-- slots the caller holds (-1: none). Its limits are data, one string of
-- "window metric max" triples (`Window::index`, `Metric::index`; a kind
-- left out has no limit). Usage, an estimate or what a call used, is one
-- string too: the count of each metric in order, separated by spaces
-- ("1 250": a request and 250 tokens), so that no argument belongs to a
-- metric. Then ADMISSION_ARGS per
-- admission: its workspace's number, its estimate as one argument per
-- metric (the hottest path then parses no string), the probe interval
-- (ms), and its reservation: empty when the caller holds it, or "id TTL
-- (ms) model" to record it. Each argument costs the call about a tenth of
-- a microsecond before the script runs, and a reservation id, new at
-- every admission, more than that: a held reservation, which the script
-- never names, takes one empty argument. Then
-- SETTLEMENT_ARGS per settlement of a recorded reservation: its
-- workspace's number, reservation id and what the call used ('-': keep the
-- estimate). Then HELD_SETTLEMENT_ARGS per settlement of a held one: its
-- workspace's number, when it was charged (Redis's microseconds, as
-- answered), its estimate and what the call used, as an admission's
-- estimate, one argument per metric ('-' each: keep the estimate), as
-- reading usage from one string costs the script several times as much.
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
-- when it was charged (ms), the estimate charged for it (as usage is
-- passed), whether it was a probe, its model.
-- A batch whose work carries scoped limits has a scoped part after the
-- settlements (see `read_scoped_part`), and its answer a sixth field
-- (see `scoped_answer`); the scope counters are described with
-- `open_scope`.
--
-- The other operations concern one workspace (KEYS[3]): ARGV[3] is its id
-- and ARGV[4] its calendar bounds; arg(1) onwards depends on the operation.
-- They answer {outcome, now (microseconds), base, changes, expired}, the
-- base always there.
--
-- Every call first removes reservations past their expiry (their
-- estimates stay charged), some at a time, and answers them as `expired`:
-- their expiry members, "workspace|reservation id|charged (microseconds)|
-- estimate|probe|model".

local MINUTE_S = 60
-- The metrics and windows, in the order of `Metric::ALL` and `Window::ALL`:
-- the minute first, then the calendar periods. Their numbers are written
-- in from those lists when the script is loaded (`state.rs`), so that the
-- layout follows them by construction.
local METRICS, WINDOWS = @METRICS@, @WINDOWS@
-- `text` `times` times over. The library's top level runs where Redis
-- offers none of Lua's standard libraries (`string`, `math` and the rest
-- are there only once a function is called), so it repeats by hand.
local function repeated(text, times)
  local out = ''
  for _ = 1, times do out = out .. text end
  return out
end
local CALENDARS = WINDOWS - 1
-- Header fields by index (see the top).
local VERSION, HOLD, BILLING, BILLING_SINCE, NEXT_PROBE, LAST_RESET = 1, 2, 3, 4, 5, 6
local KEY_EXPIRY, SLOTS_VERSION, NEWEST_SECOND = 7, 8, 9
local NEWEST = NEWEST_SECOND + 1
local TOTALS = NEWEST + METRICS
local BOUNDS = TOTALS + WINDOWS * METRICS
local HEADER_FIELDS = BOUNDS + 2 * CALENDARS - 1
local HEADER = '<' .. repeated('d', HEADER_FIELDS)
local HEADER_BYTES = 8 * HEADER_FIELDS
local SLOT_FIELDS = 1 + METRICS
local SLOT = '<' .. repeated('d', SLOT_FIELDS)
local SLOT_CHANGE = '<' .. repeated('d', 1 + SLOT_FIELDS)
local SLOT_BYTES = 8 * SLOT_FIELDS
local STATE_BYTES = HEADER_BYTES + MINUTE_S * SLOT_BYTES
local WORKSPACE_ARGS = 4
local ADMISSION_ARGS = 3 + METRICS
local SETTLEMENT_ARGS = 3
local HELD_SETTLEMENT_ARGS = 2 + 2 * METRICS
-- The most expired reservations one call removes; the rest wait for the
-- next calls, so that no call takes long.
local EXPIRED_PER_CALL = '256'
-- The offsets of the state's parts (its header's last byte, each slot's
-- first), written out once: Redis writes out a number passed to
-- redis.call at every call ("%.17g"), which costs more than reading the
-- header itself.
local HEADER_LAST = '' .. (HEADER_BYTES - 1)
local SLOT_OFFSETS = {}
for index = 0, MINUTE_S - 1 do SLOT_OFFSETS[index] = '' .. (HEADER_BYTES + index * SLOT_BYTES) end
-- The call's keys and arguments, and Redis's time as it started (see
-- `counters`).
local KEYS, ARGV, RESERVATIONS, EXPIRIES, op, channel
local now, now_us, now_second, now_text, now_us_text

-- The header index of the total of `window` (0: the minute, then the
-- calendar periods) and `metric` (1-based).
local function total(window, metric)
  return TOTALS + window * METRICS + metric - 1
end

-- The header index of calendar period `c`'s start (1: the day); its end
-- follows.
local function period_start(c)
  return BOUNDS + 2 * (c - 1)
end

local function slot_at(at_second)
  return HEADER_BYTES + (at_second % MINUTE_S) * SLOT_BYTES + 1
end

-- The whole state as read, fetched the first time a slot is needed.
local function whole(w)
  if not w.blob then w.blob = redis.call('GET', w.state) end
  return w.blob
end

-- A slot as {second, count of each metric}. Slots written during this call
-- stay in `w.slots` until `save`, so that many admissions in one call
-- rebuild the stored string once; the newest second lives in the header.
local function read_slot(w, at_second)
  local h = w.h
  if at_second == h[NEWEST_SECOND] then
    local slot = { at_second }
    for m = 1, METRICS do slot[1 + m] = h[NEWEST + m - 1] end
    return slot
  end
  local slot = w.slots[at_second % MINUTE_S]
  if slot then return slot end
  slot = { struct.unpack(SLOT, whole(w), slot_at(at_second)) }
  -- struct.unpack answers the next position last.
  slot[SLOT_FIELDS + 1] = nil
  return slot
end

local function write_slot(w, slot)
  local h = w.h
  if slot[1] == h[NEWEST_SECOND] then
    for m = 1, METRICS do h[NEWEST + m - 1] = slot[1 + m] end
    return
  end
  w.slots[slot[1] % MINUTE_S] = slot
end

-- Moves each stored calendar period to the one holding now, from the
-- caller's bounds, when it is over; a new period counts nothing yet. Only
-- forward: should Redis's clock step back past a period's start, its count
-- stays, as zeroing it twice (now, and again when the clock returns) would
-- let its usage through twice.
local function roll_calendars(h, calendars)
  local periods
  for c = 1, CALENDARS do
    local at = period_start(c)
    if now >= h[at + 1] then
      if not periods then
        periods = {}
        for period in string.gmatch(calendars, '[^|]+') do periods[#periods + 1] = period end
      end
      local bounds = {}
      for bound in string.gmatch(periods[c] or '', '%-?%d+') do bounds[#bounds + 1] = tonumber(bound) end
      -- Should none hold now, the caller's current period applies.
      local start, finish = bounds[2], bounds[3]
      for i = 1, #bounds - 1 do
        if bounds[i] <= now and now < bounds[i + 1] then start, finish = bounds[i], bounds[i + 1] end
      end
      if h[at] ~= start then
        for m = 1, METRICS do h[total(c, m)] = 0 end
      end
      h[at], h[at + 1] = start, finish
    end
  end
end

-- Opens a workspace: its state from KEYS[k], its id and calendar bounds.
-- The window slides to now: a slot holds the second it was last written
-- for, so a slot whose second is a whole minute behind is one that leaves
-- the totals.
local function open(k, id, calendars)
  local header = redis.call('GETRANGE', KEYS[k], '0', HEADER_LAST)
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
  -- the header as read. `limits` holds the workspace's limits flat, as
  -- {total's index, metric, max} each; `kept` is the longest calendar
  -- period a limit counts over (see `stored`).
  local w = { state = KEYS[k], id = id, slots = {}, blob = blob, new = new, changes = changes,
    h = h, slots_version = h[SLOTS_VERSION], known = -1, second = 0, changed = false,
    limits = false, kept = 1 }
  roll_calendars(h, calendars)
  -- Should Redis's clock step back, counting goes on in the newest second.
  local newest = h[NEWEST_SECOND]
  w.second = math.max(now_second, newest)
  if w.second - newest >= MINUTE_S then
    for m = 1, METRICS do h[total(0, m)] = 0 end
  elseif w.second > newest then
    -- The newest second is no longer the newest: it moves to its slot.
    w.slots[newest % MINUTE_S] = read_slot(w, newest)
    for s = newest + 1, w.second do
      local slot = read_slot(w, s)
      if slot[1] == s - MINUTE_S then
        for m = 1, METRICS do
          h[total(0, m)] = math.max(h[total(0, m)] - slot[1 + m], 0)
        end
      end
    end
  end
  if w.second > newest then
    h[NEWEST_SECOND] = w.second
    for m = 1, METRICS do h[NEWEST + m - 1] = 0 end
  end
  return w
end

-- Adds `counts` (one per metric) to the bucket of `at_second`, unless that
-- second left the window.
local function add_minute(w, at_second, counts)
  if at_second <= w.second - MINUTE_S then return end
  local h = w.h
  -- Most admissions count into the newest second, which the header holds:
  -- added there in place, without building a slot.
  if at_second == h[NEWEST_SECOND] then
    for m = 1, METRICS do
      local count = counts[m]
      if count ~= 0 then
        local newest, minute = NEWEST + m - 1, TOTALS + m - 1
        local before = h[newest]
        local after = before + count
        if after < 0 then after = 0 end
        h[minute] = h[minute] + after - before
        h[newest] = after
      end
    end
    return
  end
  local old = read_slot(w, at_second)
  if old[1] ~= at_second and old[1] > at_second then return end
  local slot = { at_second }
  for m = 1, METRICS do
    local before = old[1] == at_second and old[1 + m] or 0
    slot[1 + m] = math.max(before + counts[m], 0)
    w.h[total(0, m)] = w.h[total(0, m)] + slot[1 + m] - before
  end
  write_slot(w, slot)
end

-- Charges an admission's `costs` (or a call's counted without one) now:
-- to the newest second, which the header holds (`open` made it now's), to
-- the minute's totals and to every calendar period's. Costs are never
-- negative, so nothing is clamped, and a metric the call costs nothing of
-- is skipped: the admission path's own loop, as `add_minute` and
-- `add_calendars` serve corrections too.
local function charge_now(w, costs)
  local h = w.h
  for m = 1, METRICS do
    local cost = costs[m]
    if cost > 0 then
      local newest = NEWEST + m - 1
      h[newest] = h[newest] + cost
      for at = TOTALS + m - 1, BOUNDS - 1, METRICS do h[at] = h[at] + cost end
    end
  end
end

-- Adds `counts` to every calendar period; `charged`, when given, is when
-- the usage was charged: a period that started since gains what is added
-- but loses nothing.
local function add_calendars(w, counts, charged)
  local h = w.h
  for c = 1, CALENDARS do
    local since = charged and charged < h[BOUNDS + 2 * (c - 1)]
    local at = TOTALS + c * METRICS - 1
    for m = 1, METRICS do
      local count = counts[m]
      if since and count < 0 then count = 0 end
      -- Most settlements change some metrics only (a request stays one).
      if count ~= 0 then
        local after = h[at + m] + count
        h[at + m] = after > 0 and after or 0
      end
    end
  end
end

-- Stores the state with a new version and keeps it for as long as any of
-- it counts: the longest calendar period a limit counts over (at least the
-- day), or a hold beyond it. Answers the announcement of the change, "id
-- version"; other instances reload the workspace when they hear of a
-- version newer than theirs. Published from here, it costs no extra round
-- trip.
local function stored(w)
  local h = w.h
  h[VERSION] = math.max(h[VERSION] + 1, now_us)
  if w.new or next(w.slots) then h[SLOTS_VERSION] = h[VERSION] end
  local keep_until = math.max(h[period_start(w.kept) + 1], h[HOLD], now) + 60000
  -- A billing block lasts until a probe succeeds or an admin resets it,
  -- however many days that takes; each probe admitted stores it again.
  if h[BILLING] > 0 then keep_until = math.max(keep_until, now + 30 * 86400000) end
  -- The expiry moves about once a period: with the day or month, a hold or
  -- a block.
  local expiry_moved = keep_until > h[KEY_EXPIRY] or w.new
  if expiry_moved then h[KEY_EXPIRY] = keep_until end
  local header = struct.pack(HEADER, unpack(h, 1, HEADER_FIELDS))
  if w.new then
    -- Written whole, once: SETRANGE would leave it short.
    local parts, at = { header }, HEADER_BYTES + 1
    for index = 0, MINUTE_S - 1 do
      local slot = w.slots[index]
      if slot then
        local start = HEADER_BYTES + index * SLOT_BYTES + 1
        parts[#parts + 1] = string.sub(w.blob, at, start - 1)
        parts[#parts + 1] = struct.pack(SLOT, unpack(slot, 1, SLOT_FIELDS))
        at = start + SLOT_BYTES
      end
    end
    parts[#parts + 1] = string.sub(w.blob, at)
    w.blob, w.changes = table.concat(parts), ''
    redis.call('SET', w.state, w.blob, 'PXAT', string.format('%d', h[KEY_EXPIRY]))
  else
    redis.call('SETRANGE', w.state, '0', header)
    -- Most calls write no slot: their changes are the header alone.
    w.changes = header
    if next(w.slots) then
      local changes = { header }
      for index, slot in pairs(w.slots) do
        redis.call('SETRANGE', w.state, SLOT_OFFSETS[index],
          struct.pack(SLOT, unpack(slot, 1, SLOT_FIELDS)))
        changes[#changes + 1] = struct.pack(SLOT_CHANGE, index, unpack(slot, 1, SLOT_FIELDS))
      end
      w.changes = table.concat(changes)
    end
    if expiry_moved then
      redis.call('PEXPIREAT', w.state, string.format('%d', h[KEY_EXPIRY]))
    end
  end
  w.slots = {}
  return w.id .. ' ' .. string.format('%d', h[VERSION])
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
local new_reservations, new_expiries, keep_reservations

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

-- Usage as passed (see the top) into `counts`, one number per metric;
-- answers `counts`. A pattern rather than a loop over matches, which
-- costs more.
local USAGE = '^(%d+)' .. repeated(' (%d+)', METRICS - 1)
local function read_usage(text, counts)
  local parsed = { string.match(text, USAGE) }
  for m = 1, METRICS do counts[m] = tonumber(parsed[m]) end
  return counts
end

-- A reservation's record: when it was charged, its estimate, whether it
-- was a probe, its model and, if it charged scoped limits, their counters
-- (`resolved`, see `open_scope`).
local function parse_reservation(record)
  local charged, estimate, probe, model, scoped =
    string.match(record, '^(%d+)|([%d ]+)|(%d)|([^|]*)|?(.*)$')
  return tonumber(charged), read_usage(estimate, {}), probe, model, scoped
end

-- Removes reservations past their expiry; answers their expiry members
-- as they are, for the caller to read.
local function expire_reservations()
  local due = redis.call('ZRANGE', EXPIRIES, '-inf', now_text, 'BYSCORE', 'LIMIT', '0',
    EXPIRED_PER_CALL)
  if #due == 0 then return due end
  local fields = {}
  for i, member in ipairs(due) do fields[i] = string.match(member, '^[^|]*|[^|]*') end
  redis.call('HDEL', RESERVATIONS, unpack(fields))
  -- The members due are the lowest ranks: removed together, not looked up
  -- one by one.
  redis.call('ZREMRANGEBYRANK', EXPIRIES, '0', string.format('%d', #due - 1))
  return due
end

-- The expired reservations a call removed as it started.
local expired

-- Scoped limits (per model, per end user, `domain::scope`): a counter per
-- listed rule and per value of an each-rule, each a key of its own that
-- expires once its windows are clear, so that a million end users cost
-- memory only while they count. Everything here is entered only when a
-- call carries scoped limits: an admission without them pays one table
-- look-up.
--
-- A counter's key is its rule's, "<prefix>scope1:<workspace>:<rule id>",
-- for a listed rule; for an each-rule, the rule's key followed by
-- ":<the value's fingerprint>", or by ":overflow" for the counter that
-- values beyond the cap share (stricter, never looser), and the rule's
-- key followed by ":tracked" is a ZSET of the values counted apart,
-- scored by when their counters expire, to count them against the cap.
-- Counters are named by the caller (or by a reservation's record) rather
-- than in KEYS, as there may be any number of them; quotawatch's keys all
-- live in one Redis, never a cluster.
-- A counter's value is little-endian doubles: the workspace's last reset
-- (microseconds) when it was written, as a counter older than the
-- workspace's reset counts nothing, which makes a reset one write
-- whatever the counters; when it expires (ms); then, for each calendar
-- period, its start and a count per metric; then each second of the
-- minute that counted, oldest first: the second and a count per metric.
-- Its periods are the workspace's, rolled with it.
--
-- A call names the counters an admission checks and charges as one
-- string of ';'-separated refs: "L <key> <limits>" for a listed rule's,
-- "E <rule key> <fingerprint> <limits>" for an each-rule's, limits as a
-- workspace's. An admission charged the counters it answers as
-- `resolved`, ';'-separated "<key> <kept> <minute>": the counter's key,
-- the last calendar period (1: the day) any of its limits counts over
-- (0: none) and 1 if it has a minute limit, which is all a settlement
-- needs to correct the counter and keep it as long as it counts.
local SCOPE_HEAD = 2 + CALENDARS * (1 + METRICS)
local SCOPE_SECOND = 1 + METRICS
local FINGERPRINT = '^(.+):(' .. repeated('%x', 32) .. ')$'
-- The scope counters this call opened, by key, each written once at its
-- end; and how many values an each-rule counts apart at most (`batch`
-- passes it).
local scope_counters, scope_cap
-- A batch's admissions that carry refs, by the index of their first
-- argument; nil when none does.
local scoped_admissions

-- Opens the scope counter at `key` for workspace `w`: its counts as of
-- now, those of an earlier reset or period dropped.
local function open_scope(w, key)
  local sc = scope_counters[key]
  if sc then return sc end
  local h = w.h
  local blob = redis.call('GET', key)
  local values = {}
  if blob then
    values = { struct.unpack('<' .. string.rep('d', #blob / 8), blob) }
    values[#values] = nil
  end
  local fresh = not blob or values[1] < h[LAST_RESET]
  sc = { key = key, w = w, exists = blob and true or false, changed = false, kept = 0,
    keeps_minute = false, expires = fresh and 0 or values[2], cal = {}, minute = {},
    tracked = false, value = false }
  for c = 1, CALENDARS do
    local at = 3 + (c - 1) * (1 + METRICS)
    local current = not fresh and values[at] == h[period_start(c)]
    local counts = {}
    for m = 1, METRICS do counts[m] = current and values[at + m] or 0 end
    sc.cal[c] = counts
  end
  if not fresh then
    for at = SCOPE_HEAD + 1, #values, SCOPE_SECOND do
      if values[at] > w.second - MINUTE_S then
        sc.minute[#sc.minute + 1] = { unpack(values, at, at + METRICS) }
      end
    end
  end
  scope_counters[key] = sc
  return sc
end

-- A scoped limit's text (as a workspace's) as {window, metric, max}
-- triples, flat, with the last calendar period it counts over (`kept`)
-- and whether it has a minute limit; each text parsed once per call.
local parsed_scope_limits
local function scope_limits(text)
  local parsed = parsed_scope_limits[text]
  if parsed then return parsed end
  parsed = { kept = 0, minute = false }
  local values = {}
  for value in string.gmatch(text, '%d+') do values[#values + 1] = tonumber(value) end
  for i = 1, #values - 2, 3 do
    local window = values[i]
    parsed[#parsed + 1], parsed[#parsed + 2], parsed[#parsed + 3] = window, values[i + 1] + 1,
      values[i + 2]
    if window == 0 then parsed.minute = true elseif window > parsed.kept then parsed.kept = window end
  end
  parsed_scope_limits[text] = parsed
  return parsed
end

-- Notes how long `sc` counts: the longest its limits keep it.
local function keeps(sc, kept, minute)
  if kept > sc.kept then sc.kept = kept end
  sc.keeps_minute = sc.keeps_minute or minute
end

-- The counter of value `fingerprint` of the each-rule at `rule_key`: its
-- own, or past the cap, for a value not counted yet, the shared overflow
-- counter.
local function each_counter(w, rule_key, fingerprint)
  local own = open_scope(w, rule_key .. ':' .. fingerprint)
  if own.tracked then return own end
  local tracked = rule_key .. ':tracked'
  if not own.exists then
    redis.call('ZREMRANGEBYSCORE', tracked, '-inf', now_text)
    if redis.call('ZCARD', tracked) >= scope_cap then
      return open_scope(w, rule_key .. ':overflow')
    end
    -- Counted against the cap at once, so that a batch of new values
    -- cannot pass it; scored by its expiry when it is written.
    redis.call('ZADD', tracked, string.format('%d', now + MINUTE_S * 1000), fingerprint)
  end
  own.tracked, own.value = tracked, fingerprint
  return own
end

-- The counters an admission's refs name, each {sc, limits}.
local function scope_charges(w, refs)
  local charges = {}
  for ref in string.gmatch(refs, '[^;]+') do
    local kind, key, rest = string.match(ref, '^(%a) (%S+) (.*)$')
    local sc
    if kind == 'E' then
      local fingerprint
      fingerprint, rest = string.match(rest, '^(%S+) ?(.*)$')
      sc = each_counter(w, key, fingerprint)
    else
      sc = open_scope(w, key)
    end
    local limits = scope_limits(rest)
    keeps(sc, limits.kept, limits.minute)
    -- The workspace's state outlives its scope counters: their counts
    -- are valid only against its last reset.
    if limits.kept > w.kept then w.kept = limits.kept end
    charges[#charges + 1] = { sc = sc, limits = limits }
  end
  return charges
end

-- Whether a request costing `costs` fits every limit of `charges`, by the
-- rules of `admit_one`.
local function scopes_fit(charges, costs)
  for _, charge in ipairs(charges) do
    local sc, limits = charge.sc, charge.limits
    for i = 1, #limits, 3 do
      local window, metric, max = limits[i], limits[i + 1], limits[i + 2]
      local cost, used = costs[metric], 0
      if window == 0 then
        for _, second in ipairs(sc.minute) do used = used + second[1 + metric] end
      else
        used = sc.cal[window][metric]
      end
      if cost > max or used + (cost > 1 and cost or 1) > max then return false end
    end
  end
  return true
end

-- Adds `counts` to the second `at_second` of `sc`'s minute, if it keeps
-- one and that second is still in it (see `add_minute`).
local function add_scope_minute(sc, at_second, counts)
  if not sc.keeps_minute or at_second <= sc.w.second - MINUTE_S then return end
  local second
  for _, counted in ipairs(sc.minute) do
    if counted[1] == at_second then second = counted end
  end
  if not second then
    -- Only the newest second is ever added: the others are corrected.
    second = { at_second }
    for m = 1, METRICS do second[1 + m] = 0 end
    sc.minute[#sc.minute + 1] = second
  end
  for m = 1, METRICS do second[1 + m] = math.max(second[1 + m] + counts[m], 0) end
end

-- Adds `counts` to each of `sc`'s calendar periods, as `add_calendars`
-- does to the workspace's.
local function add_scope_calendars(sc, counts, charged)
  local h = sc.w.h
  for c = 1, CALENDARS do
    local since = charged and charged < h[period_start(c)]
    local counted = sc.cal[c]
    for m = 1, METRICS do
      local count = counts[m]
      if since and count < 0 then count = 0 end
      counted[m] = math.max(counted[m] + count, 0)
    end
  end
end

-- Charges `costs` now to every counter of `charges`; answers them as
-- `resolved`.
local function charge_scopes(w, charges, costs)
  local resolved = {}
  for i, charge in ipairs(charges) do
    local sc = charge.sc
    add_scope_minute(sc, w.second, costs)
    add_scope_calendars(sc, costs)
    sc.changed = true
    resolved[i] = sc.key .. ' ' .. charge.limits.kept .. ' ' .. (charge.limits.minute and 1 or 0)
  end
  return table.concat(resolved, ';')
end

-- Corrects the counters a settlement names (`resolved`) as `settle_one`
-- corrects the workspace's. A counter that expired meanwhile is made anew
-- with the usage beyond the estimate.
local function correct_scopes(w, resolved, charged, correction, extra, any_extra)
  local charged_second = math.floor(charged / 1000)
  for ref in string.gmatch(resolved, '[^;]+') do
    local key, kept, minute = string.match(ref, '^(%S+) (%d+) (%d)$')
    if key then
      local sc = open_scope(w, key)
      keeps(sc, tonumber(kept), minute == '1')
      local rule_key, fingerprint = string.match(key, FINGERPRINT)
      if rule_key then sc.tracked, sc.value = rule_key .. ':tracked', fingerprint end
      local in_minute = false
      for _, second in ipairs(sc.minute) do
        if second[1] == charged_second then in_minute = true end
      end
      if in_minute then
        add_scope_minute(sc, charged_second, correction)
      elseif any_extra then
        add_scope_minute(sc, w.second, extra)
      end
      add_scope_calendars(sc, correction, charged)
      sc.changed = true
    end
  end
end

-- `sc` as stored, and when it expires: at the end of the last calendar
-- period it keeps that counted anything, or when its newest second with
-- usage leaves the minute; 0 once nothing counts.
local function pack_scope(sc)
  local h = sc.w.h
  local expires = 0
  for c = sc.kept, 1, -1 do
    local counted = false
    for m = 1, METRICS do counted = counted or sc.cal[c][m] > 0 end
    if counted then
      expires = h[period_start(c) + 1]
      break
    end
  end
  local values = { h[LAST_RESET], 0 }
  for c = 1, CALENDARS do
    values[#values + 1] = h[period_start(c)]
    for m = 1, METRICS do values[#values + 1] = sc.cal[c][m] end
  end
  if sc.keeps_minute then
    for _, second in ipairs(sc.minute) do
      local counted = false
      for m = 1, METRICS do counted = counted or second[1 + m] > 0 end
      if counted then
        for f = 1, SCOPE_SECOND do values[#values + 1] = second[f] end
        expires = math.max(expires, (second[1] + MINUTE_S) * 1000)
      end
    end
  end
  values[2] = expires
  return struct.pack('<' .. string.rep('d', #values), unpack(values)), expires
end

-- Writes the counters this call changed, each with its expiry (its value's
-- score in the rule's tracked set moves with it), and answers every
-- counter that exists as {key, state, key, state, ...}: an empty state is
-- one that expired.
local function save_scopes()
  local answered = {}
  for key, sc in pairs(scope_counters) do
    local blob, expires = pack_scope(sc)
    if sc.changed then
      if expires <= now then
        redis.call('DEL', key)
        blob = ''
      else
        redis.call('SET', key, blob, 'PXAT', string.format('%d', expires))
        if sc.tracked and expires ~= sc.expires then
          local at = string.format('%d', expires)
          redis.call('ZADD', sc.tracked, at, sc.value)
          -- Kept as long as its latest member: the first sets an expiry
          -- where there was none, the second moves it only later.
          redis.call('PEXPIREAT', sc.tracked, at, 'NX')
          redis.call('PEXPIREAT', sc.tracked, at, 'GT')
        end
      end
    end
    if sc.exists or sc.changed then
      answered[#answered + 1] = key
      answered[#answered + 1] = blob
    end
  end
  return answered
end

-- Opens the n-th workspace of a batch, from ARGV[b..]. Its limits are
-- parsed once, for all its admissions.
-- Limits parsed, by their argument, kept from one call to the next (the
-- library's top level outlives its calls): workspaces mostly share the
-- server's default limits, whose text then costs a look-up rather than
-- parsing it at every call. Forgotten all at once when PARSED_LIMITS_KEPT
-- are held, so that many workspaces' own limits cannot grow it for ever.
local PARSED_LIMITS_KEPT = 1024
local parsed_limits, parsed_limits_held = {}, 0

local function open_in_batch(n, b)
  local w = open(2 + n, ARGV[b], ARGV[b + 1])
  w.known = tonumber(ARGV[b + 3])
  local text = ARGV[b + 2]
  local parsed = parsed_limits[text]
  if not parsed then
    local limits, values, kept = {}, {}, 1
    for value in string.gmatch(text, '%d+') do values[#values + 1] = tonumber(value) end
    for i = 1, #values - 2, 3 do
      local window, metric, max = values[i], values[i + 1] + 1, values[i + 2]
      limits[#limits + 1] = total(window, metric)
      limits[#limits + 1] = metric
      limits[#limits + 1] = max
      if window > kept then kept = window end
    end
    parsed = { limits = limits, kept = kept }
    if parsed_limits_held >= PARSED_LIMITS_KEPT then parsed_limits, parsed_limits_held = {}, 0 end
    parsed_limits[text], parsed_limits_held = parsed, parsed_limits_held + 1
  end
  w.limits, w.kept = parsed.limits, parsed.kept
  return w
end

-- Every admission's reservation expires after its TTL: the scores are
-- formatted once per TTL.
local expiry_at

-- One admission, from ARGV[a..]: charges every limit or none. Answers its
-- outcome byte.
-- What one admission costs of each metric; one table for every admission
-- of the call, as each is done with it before the next.
local costs = {}
-- The counts read in this call, by their argument: calls mostly count the
-- same ("1" request, "0" dollars), and a look-up costs less than parsing
-- the number again.
local counts_read

-- Reads a count per metric from ARGV[first..] into `counts`; answers
-- `counts`.
local function read_counts(first, counts)
  for m = 1, METRICS do
    local text = ARGV[first + m - 1]
    local count = counts_read[text]
    if not count then
      count = tonumber(text)
      counts_read[text] = count
    end
    counts[m] = count
  end
  return counts
end

local function admit_one(w, a)
  local h = w.h
  local scoped = scoped_admissions and scoped_admissions[a]
  read_counts(a + 1, costs)
  local estimate_at = a + 1
  -- The arguments after the estimate: ARGV[a + 1] is the probe interval,
  -- ARGV[a + 2] the reservation.
  a = a + METRICS
  local limits = w.limits
  for i = 1, #limits, 3 do
    -- It fits if `cost` more stays within the limit; one that alone
    -- exceeds the limit never fits. Written out here, as a function call
    -- per limit would cost more than the test.
    local max, cost = limits[i + 2], costs[limits[i + 1]]
    if cost > max or h[limits[i]] + (cost > 1 and cost or 1) > max then return '0' end
  end
  if h[HOLD] > now then return '0' end
  if scoped then
    scoped.charges = scoped.charges or scope_charges(w, scoped.refs)
    if not scopes_fit(scoped.charges, costs) then return '0' end
  end
  local probe = '0'
  if h[BILLING] > 0 then
    if now < h[NEXT_PROBE] then return '0' end
    probe = '1'
    h[NEXT_PROBE] = now + tonumber(ARGV[a + 1])
  end
  charge_now(w, costs)
  w.changed = true
  if scoped then scoped.resolved = charge_scopes(w, scoped.charges, costs) end
  local outcome = probe == '1' and '2' or '1'
  -- A reservation the caller holds is not recorded (see `batch`).
  local reservation = ARGV[a + 2]
  if reservation == '' then return outcome end
  local id, ttl, model = string.match(reservation, '^(%d+) (%d+) (.*)$')
  local field = w.id .. '|' .. id
  -- The estimate is recorded as passed: writing the numbers out again
  -- would cost more than the rest of the record.
  local estimate = table.concat(ARGV, ' ', estimate_at, estimate_at + METRICS - 1)
  local record = now_us_text .. '|' .. estimate .. '|' .. probe .. '|' .. model
  if scoped then record = record .. '|' .. scoped.resolved end
  new_reservations[#new_reservations + 1] = field
  new_reservations[#new_reservations + 1] = record
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

-- What one settlement works with, a count per metric each: its estimate
-- as passed, what the call used, the estimate it keeps, the correction and
-- the part of it beyond the estimate. Settlements are done one at a time,
-- each with these before the next, so that settling allocates nothing.
local settled_estimate, settled_actual, kept_estimate, correction, extra = {}, {}, {}, {}, {}

-- Settles a reservation charged at `charged_us` for `estimate` (a count
-- per metric): the correction of its estimate by what the call used
-- (`actual`, a count per metric; nil keeps the estimate), in the
-- workspace's counters and in the scope counters it charged (`scoped`, as
-- `resolved`, or nil). Answers when it was charged (ms) and the estimate
-- charged for it (`kept_estimate`, until the next settlement).
local function settle_one(w, charged_us, estimate, actual, scoped)
  -- A reset since the admission charged nothing of it from then on, so
  -- the estimate it keeps is nothing too.
  local last_reset = w.h[LAST_RESET]
  local since_reset = charged_us < last_reset
  local charged = math.floor(math.max(charged_us, last_reset) / 1000)
  -- The correction lands in the second the request was charged while that
  -- second is in the window; usage beyond the estimate is charged now.
  local charged_estimate = kept_estimate
  local any_extra = false
  for m = 1, METRICS do
    local kept = since_reset and 0 or estimate[m]
    local change = actual and actual[m] - kept or 0
    charged_estimate[m], correction[m] = kept, change
    if change > 0 then
      extra[m], any_extra = change, true
    else
      extra[m] = 0
    end
  end
  local charged_second = math.floor(charged / 1000)
  -- Most calls settle within the second they were charged in, which the
  -- header holds: known to be in the window without reading its slot.
  if charged_second == w.h[NEWEST_SECOND]
      or (charged_second > w.second - MINUTE_S and read_slot(w, charged_second)[1] == charged_second) then
    add_minute(w, charged_second, correction)
  elseif any_extra then
    add_minute(w, w.second, extra)
  end
  -- Each calendar period gains the extra usage, and loses the unused
  -- estimate if the request was charged in it.
  add_calendars(w, correction, charged)
  w.changed = true
  if scoped and scoped ~= '' then
    correct_scopes(w, scoped, charged, correction, extra, any_extra)
  end
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
      local charged_us, estimate, probe, model, scoped = parse_reservation(record)
      local used = ARGV[b + 2]
      local actual = used ~= '-' and read_usage(used, settled_actual) or nil
      local charged, charged_estimate =
        settle_one(workspaces[tonumber(ARGV[b])], charged_us, estimate, actual, scoped)
      charged_estimate = table.concat(charged_estimate, ' ')
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
-- what each charged (its scope counters in `held_scopes`, by its number),
-- and answers for itself that it settles once.
local function settle_held(workspaces, s, count, held_scopes)
  for j = 1, count do
    local b = s + (j - 1) * HELD_SETTLEMENT_ARGS
    local used = b + 2 + METRICS
    local actual = ARGV[used] ~= '-' and read_counts(used, settled_actual) or nil
    settle_one(workspaces[tonumber(ARGV[b])], tonumber(ARGV[b + 1]),
      read_counts(b + 2, settled_estimate), actual, held_scopes[j])
  end
end

-- Reads a batch's scoped part, from ARGV[e..], present only when some of
-- its work carries scoped limits: the cap of values an each-rule counts
-- apart, the number of admissions with refs, then each one's number and
-- refs; the number of held settlements with scope counters, then each
-- one's number and counters (as `resolved`). Admissions' refs are kept by
-- their first argument's index (admissions start at ARGV[a]); answers
-- the held settlements' counters by number.
local function read_scoped_part(e, a)
  scope_cap = tonumber(ARGV[e])
  scoped_admissions = {}
  local admissions = tonumber(ARGV[e + 1])
  e = e + 2
  for _ = 1, admissions do
    local number = tonumber(ARGV[e])
    scoped_admissions[a + (number - 1) * ADMISSION_ARGS] = { number = number, refs = ARGV[e + 1] }
    e = e + 2
  end
  local held_scopes = {}
  for _ = 1, tonumber(ARGV[e]) do
    held_scopes[tonumber(ARGV[e + 1])] = ARGV[e + 2]
    e = e + 2
  end
  return held_scopes
end

-- What a call answers of scoped limits: each admission's counters charged
-- ({number, resolved, ...}, for the caller to settle with) and the
-- counters' states ({key, state, ...}, see `save_scopes`).
local function scoped_answer()
  local resolved = {}
  for _, scoped in pairs(scoped_admissions or {}) do
    if scoped.resolved then
      resolved[#resolved + 1] = scoped.number
      resolved[#resolved + 1] = scoped.resolved
    end
  end
  return { resolved, save_scopes() }
end

local function batch()
  local count, admissions = tonumber(ARGV[3]), tonumber(ARGV[4])
  local settlements, held_settlements = tonumber(ARGV[5]), tonumber(ARGV[6])
  local workspaces = {}
  for n = 1, count do
    workspaces[n] = open_in_batch(n, 7 + (n - 1) * WORKSPACE_ARGS)
  end
  local a = 7 + count * WORKSPACE_ARGS
  -- Settlements first: what they give back is there for the admissions.
  local s = a + admissions * ADMISSION_ARGS
  local e = s + settlements * SETTLEMENT_ARGS + held_settlements * HELD_SETTLEMENT_ARGS
  local held_scopes = ARGV[e] and read_scoped_part(e, a) or {}
  local settled = settle_all(workspaces, s, settlements)
  settle_held(workspaces, s + settlements * SETTLEMENT_ARGS, held_settlements, held_scopes)
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
  local answer = { now_us, table.concat(outcomes), states, expired, settled }
  if next(scope_counters) then answer[6] = scoped_answer() end
  return answer
end

-- The operations on one workspace.
local function one_workspace()
  local w = open(3, ARGV[3], ARGV[4])
  local function arg(i) return ARGV[4 + i] end

  local function save()
    redis.call('PUBLISH', channel, stored(w))
  end

  local function reply(outcome)
    local base, changes = answer_state(w, -1)
    local answer = { outcome, now_us, base, changes, expired }
    if next(scope_counters) then answer[6] = scoped_answer() end
    return answer
  end

  if op == 'count' then
    -- Calls that happened without a reservation: arg(1) their usage, as
    -- passed (see the top), counted now whatever the limits.
    -- arg(2), when given, is the scoped limits they fall under, as an
    -- admission's refs, with the cap of arg(3): charged as the workspace is.
    local counts = read_usage(arg(1), {})
    charge_now(w, counts)
    if arg(2) then
      scope_cap = tonumber(arg(3))
      charge_scopes(w, scope_charges(w, arg(2)), counts)
    end
    save()
    return reply(1)

  elseif op == 'peek' then
    -- arg(1), when given, names listed rules' counters (as an admission's
    -- refs) to answer too, changing nothing.
    if arg(1) then scope_charges(w, arg(1)) end
    return reply(1)

  elseif op == 'reset' or op == 'reset_usage' then
    -- Requests in flight keep their reservations, charged nothing from the
    -- reset on (see `settle`). The version and the calendar bounds stay;
    -- `reset_usage` keeps the blocks too.
    local h = w.h
    local fresh = { struct.unpack(HEADER, string.rep('\0', HEADER_BYTES)) }
    fresh[VERSION], fresh[NEWEST_SECOND], fresh[LAST_RESET] = h[VERSION], w.second, now_us
    for at = BOUNDS, HEADER_FIELDS do fresh[at] = h[at] end
    if op == 'reset_usage' then
      for _, at in ipairs({ HOLD, BILLING, BILLING_SINCE, NEXT_PROBE }) do fresh[at] = h[at] end
    end
    w.h = fresh
    w.blob, w.new = string.rep('\0', STATE_BYTES), true
    w.slots = {}
    save()
    return reply(1)

  elseif op == 'lift' then
    -- An admin lifts the upstream's blocks; the counts stay.
    local h = w.h
    h[HOLD], h[BILLING], h[BILLING_SINCE], h[NEXT_PROBE] = 0, 0, 0, 0
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
    h[HOLD] = math.max(h[HOLD], tonumber(arg(1)))
    local code, since = tonumber(arg(2)), tonumber(arg(3))
    if code == 0 then
      if h[BILLING_SINCE] == since then h[BILLING], h[BILLING_SINCE], h[NEXT_PROBE] = 0, 0, 0 end
    elseif code > 0 then
      if h[BILLING] > 0 then since = math.min(since, h[BILLING_SINCE]) end
      h[BILLING], h[BILLING_SINCE], h[NEXT_PROBE] = code, since, tonumber(arg(4))
    end
    save()
    return reply(1)
  end

  return redis.error_reply('unknown operation ' .. tostring(op))
end

-- One call: sets what it works on, expires reservations due, and runs its
-- operation.
local function counters(keys, args)
  KEYS, ARGV = keys, args
  RESERVATIONS, EXPIRIES, op, channel = keys[1], keys[2], args[1], args[2]
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  now_us = tonumber(time[1]) * 1000000 + tonumber(time[2])
  now_second = math.floor(now / 1000)
  now_text, now_us_text = string.format('%d', now), string.format('%d', now_us)
  new_reservations, new_expiries, keep_reservations = {}, {}, 86400000
  scope_counters, scope_cap, scoped_admissions = {}, 0, nil
  parsed_scope_limits, expiry_at, counts_read = {}, {}, {}
  expired = expire_reservations()
  if op == 'batch' then return batch() end
  return one_workspace()
end

redis.register_function('@FUNCTION@', counters)
