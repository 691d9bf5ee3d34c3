-- Sets boxes to values (set, not flip) and records each change, atomically.
-- One call carries the toggles a worker had queued (one or more items), in
-- order, each answered as if it were a call of its own: two items on one box
-- behave as two calls one after the other. What every item would repeat
-- (reading the settings and counts, TIME, writing the counts, the seq and the
-- stored answer) is done once per call; per change only the bits, the check
-- times and the log entry.
-- KEYS[1]: {B}:config        hash: size, max_checked, freeze_after_ms, epoch
-- KEYS[2]: {B}:bits          checked bitset
-- KEYS[3]: {B}:frozen        frozen bitset
-- KEYS[4]: {B}:count         checked boxes
-- KEYS[5]: {B}:frozen_count  frozen boxes
-- KEYS[6]: {B}:seq           seq of the last change
-- KEYS[7]: {B}:log           change stream; entry id "<seq>-0", fields i (index), o ("1", "0" or "f"), c, f (counts after), e (the board's epoch), t (commit time, ms, from TIME), a (the change's origin, when it has one)
-- KEYS[8]: {B}:checked_at    sorted set: index -> ms of last check, for checked unfrozen boxes
-- KEYS[9]: {B}:op:<id>       this call's answers when it changed the board, kept so a retried call (the
--                            Redis client resending after a reconnect) gets the same answers. A call that
--                            changed nothing stores none: running it again is as if its first run never
--                            happened, so the retry's answers are the call's answers, at the retry's moment.
-- ARGV[1]: approximate MAXLEN of the log
-- ARGV[2]: ms to remember the answers under KEYS[9]
-- and from ARGV[3] on, the items, three arguments each: the index; the value, "1" or "0"; the
--   origin, 16 lowercase hex digits written as the entry's field a, or "0" for none (no field a)
-- The answers under KEYS[9] are "epoch,status,value,seq,status,value,seq,...".
-- Returns: {epoch, status, value, seq}, with status, value, seq repeated for each further item
--   epoch: the board's epoch (a string: Lua numbers would lose digits), so the
--     caller knows which board a seq belongs to
--   status  1: changed, seq is the change's
--   status  0: the box already had the value; seq 0
--   status -1: index out of range (value 0, seq 0)
--   status -2: frozen; seq > 0 when this item froze it (an uncheck after freeze_after_ms)
--   status -3: board full (max_checked boxes are checked)
--   value: the box's value after the item
-- Errors (before any write): "NOBOARD" when the board does not exist (the caller creates it: a new
-- epoch); "BADVALUE" for a value other than "1" or "0"; "BADARGS" for a partial item.
-- Each log entry carries the epoch it was written in: a reader never takes another
-- board's entries (after FLUSHALL or a rollback moved the epoch) as its own.

-- One call for this call's stored answers, both counts and the seq: a
-- script's cost here is mostly per redis.call.
local got = redis.call('MGET', KEYS[9], KEYS[4], KEYS[5], KEYS[6])
if got[1] then
  local stored = {}
  for field in string.gmatch(got[1], '[^,]+') do
    stored[#stored + 1] = #stored == 0 and field or tonumber(field)
  end
  return stored
end

local config = redis.call('HMGET', KEYS[1], 'size', 'max_checked', 'freeze_after_ms', 'epoch')
if not config[1] then
  return redis.error_reply('NOBOARD board does not exist')
end
local size = tonumber(config[1])
local max_checked = tonumber(config[2]) or 0
local freeze_after = tonumber(config[3]) or 0
local epoch = config[4]

local count = tonumber(got[2] or '0')
local frozen_count = tonumber(got[3] or '0')
local seq = tonumber(got[4] or '0')
local count_before, frozen_before, seq_before = count, frozen_count, seq

-- Every item is checked before anything is written: a script's writes are
-- not undone by a later error.
-- The items' arguments, read by position (ARGV[3 * k] and on for item k).
local arg = ARGV
local items = (#arg - 2) / 3
if items < 1 or items ~= math.floor(items) then
  return redis.error_reply('BADARGS items take three arguments each')
end
-- The valid indexes, read in one BITFIELD_RO per bitset (a box named twice is read twice; the
-- second read is superseded by the first item's outcome below).
local index, want, reads = {}, {}, {}
for k = 1, items do
  local a = 3 * k
  local i = tonumber(arg[a])
  -- Never trust the caller: a bad index must not grow the bitset.
  if i and i == math.floor(i) and i >= 0 and i < size then
    index[k] = i
    reads[#reads + 1] = 'GET'
    reads[#reads + 1] = 'u1'
    reads[#reads + 1] = i
  end
  want[k] = tonumber(arg[a + 1])
  if want[k] ~= 0 and want[k] ~= 1 then
    return redis.error_reply('BADVALUE value must be 0 or 1')
  end
end
local bit, frozen_bit = {}, {}
if #reads > 0 then
  bit = redis.call('BITFIELD_RO', KEYS[2], unpack(reads))
  -- frozen_count is the frozen bitset's ones (every script that sets a frozen
  -- bit counts it): while nothing is frozen, the frozen bitset need not be read.
  if frozen_count > 0 then
    frozen_bit = redis.call('BITFIELD_RO', KEYS[3], unpack(reads))
  end
end

-- What this call did so far, by index: a later item on the same box sees it.
local value, frozen, since = {}, {}, {}
local now
local set_bits, set_frozen, entries = {}, {}, {}
local answers = {epoch}

local function answer(status, v, s)
  answers[#answers + 1] = status
  answers[#answers + 1] = v
  answers[#answers + 1] = s
end

local function append(k, op)
  seq = seq + 1
  entries[#entries + 1] = {seq, index[k], op, count, frozen_count, arg[3 * k + 2]}
  return seq
end

local read = 0
for k = 1, items do
  local i = index[k]
  if not i then
    answer(-1, 0, 0)
  else
    read = read + 1
    local current = value[i]
    if current == nil then
      current = bit[read]
    end
    if frozen[i] or frozen_bit[read] == 1 then
      answer(-2, current, 0)
    elseif current == want[k] then
      answer(0, current, 0)
    else
      if not now then
        local t = redis.call('TIME')
        now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
      end
      if want[k] == 1 then
        if max_checked > 0 and count >= max_checked then
          answer(-3, 0, 0)
        else
          value[i] = 1
          count = count + 1
          since[i] = now
          set_bits[#set_bits + 1] = i
          set_bits[#set_bits + 1] = 1
          answer(1, 1, append(k, '1'))
        end
      else
        -- Unchecking: too late if the box has been checked for freeze_after ms (the sunset rule).
        local checked_since = since[i]
        if checked_since == nil and freeze_after > 0 then
          checked_since = tonumber(redis.call('ZSCORE', KEYS[8], i))
        end
        if freeze_after > 0 and now - (checked_since or now) >= freeze_after then
          frozen[i] = true
          frozen_count = frozen_count + 1
          since[i] = false
          set_frozen[#set_frozen + 1] = i
          answer(-2, 1, append(k, 'f'))
        else
          value[i] = 0
          count = count - 1
          since[i] = false
          set_bits[#set_bits + 1] = i
          set_bits[#set_bits + 1] = 0
          answer(1, 0, append(k, '0'))
        end
      end
    end
  end
end

if #entries == 0 then
  return answers
end

-- The writes, each once per call (a box set twice ends at its last value).
if #set_bits > 0 then
  local args = {}
  for n = 1, #set_bits, 2 do
    args[#args + 1] = 'SET'
    args[#args + 1] = 'u1'
    args[#args + 1] = set_bits[n]
    args[#args + 1] = set_bits[n + 1]
  end
  redis.call('BITFIELD', KEYS[2], unpack(args))
end
if #set_frozen > 0 then
  local args = {}
  for n = 1, #set_frozen do
    args[#args + 1] = 'SET'
    args[#args + 1] = 'u1'
    args[#args + 1] = set_frozen[n]
    args[#args + 1] = 1
  end
  redis.call('BITFIELD', KEYS[3], unpack(args))
end
if count ~= count_before then
  redis.call('INCRBY', KEYS[4], count - count_before)
end
if frozen_count ~= frozen_before then
  redis.call('INCRBY', KEYS[5], frozen_count - frozen_before)
end
local checks, unchecks = {}, {}
for i, at in pairs(since) do
  if at then
    checks[#checks + 1] = at
    checks[#checks + 1] = i
  else
    unchecks[#unchecks + 1] = i
  end
end
if #checks > 0 then
  redis.call('ZADD', KEYS[8], unpack(checks))
end
if #unchecks > 0 then
  redis.call('ZREM', KEYS[8], unpack(unchecks))
end
for n, e in ipairs(entries) do
  local args = {KEYS[7]}
  -- Trimming once per call is enough: the log is kept approximately.
  if n == #entries then
    args[#args + 1] = 'MAXLEN'
    args[#args + 1] = '~'
    args[#args + 1] = ARGV[1]
  end
  args[#args + 1] = e[1] .. '-0'
  for _, field in ipairs({'i', e[2], 'o', e[3], 'c', e[4], 'f', e[5], 'e', epoch, 't', now}) do
    args[#args + 1] = field
  end
  if e[6] ~= '0' then
    args[#args + 1] = 'a'
    args[#args + 1] = e[6]
  end
  redis.call('XADD', unpack(args))
end
redis.call('INCRBY', KEYS[6], seq - seq_before)
-- Only answers that changed the board are stored (see KEYS[9]); a plain
-- string, as cjson costs more than the rest of a small call.
redis.call('SET', KEYS[9], table.concat(answers, ','), 'PX', ARGV[2])
return answers
