-- Episodes of workspace causes: the one notification id that names a
-- cause (a limit approaching or used up, the upstream's rate limit, ...)
-- on every instance while it lasts. Each instance observes a cause at its
-- own moment, from the counters it loaded; the first to raise it names the
-- episode with the id it drew, and the others adopt that id before
-- anyone sees theirs. An episode lasts while an instance holds it: until
-- the last instance that raised the cause sees it end, or stops renewing
-- its hold (it stopped, or lost Redis). A cause raised after that is a new
-- episode, with a new id.
--
-- KEYS: one per step, the episode of one cause of one workspace: a hash of
-- `id`, the notification id that names it, and, per instance holding it,
-- until when (ms, by Redis's clock) it holds it. The key lives as long as
-- the latest hold.
-- ARGV[1] is the instance, ARGV[2] how long a hold lasts (ms), then one
-- argument per step, in order: 'hold <candidate id>' (raised here, or
-- still active here: the id is the episode's, or the candidate's if there
-- is no episode) or 'release' (ended here).
-- Answers one string per step: the episode's id for a hold, '' for a
-- release.

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local instance, hold = ARGV[1], tonumber(ARGV[2])

-- How many instances hold the episode now, this one included; forgets the
-- holds of others that ran out (an instance that stopped without ending
-- them).
local function holders(key)
  local fields = redis.call('HGETALL', key)
  local live = 0
  for i = 1, #fields, 2 do
    local name = fields[i]
    if name ~= 'id' then
      if tonumber(fields[i + 1]) > now then
        live = live + 1
      elseif name ~= instance then
        redis.call('HDEL', key, name)
      end
    end
  end
  return live
end

local answers = {}
for i, key in ipairs(KEYS) do
  local step = ARGV[2 + i]
  if step == 'release' then
    redis.call('HDEL', key, instance)
    if holders(key) == 0 then redis.call('DEL', key) end
    answers[i] = ''
  else
    local candidate = string.sub(step, 6)
    local id = redis.call('HGET', key, 'id')
    if not id or holders(key) == 0 then
      id = candidate
      redis.call('HSET', key, 'id', id)
    end
    redis.call('HSET', key, instance, now + hold)
    redis.call('PEXPIRE', key, hold)
    answers[i] = id
  end
end
return answers
