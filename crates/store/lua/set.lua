-- Sets boxes to values (set, not flip) and records each change, atomically.
-- One call carries the toggles a worker had queued (one or more items), in
-- order, each answered as if it were a call of its own: two items on one box
-- behave as two calls one after the other. What every item would repeat
-- (reading the settings and counts, TIME, writing the counts, the seq and the
-- stored answer) is done once per call; per item only reading its bit, and
-- per change writing it, its check time and its log entry.
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
for k = 1, items do
  local want = arg[3 * k + 1]
  if want ~= '0' and want ~= '1' then
    return redis.error_reply('BADVALUE value must be 0 or 1')
  end
end

-- Items apply one after the other, each writing its change at once, so a
-- later item on the same box reads what an earlier one did. Tables are few
-- on purpose: in Redis' Lua they cost about as much as a redis.call.
local answers = {epoch}
local now

local function append(index, op, origin)
  seq = seq + 1
  if origin == '0' then
    redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[1], seq .. '-0',
      'i', index, 'o', op, 'c', count, 'f', frozen_count, 'e', epoch, 't', now)
  else
    redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[1], seq .. '-0',
      'i', index, 'o', op, 'c', count, 'f', frozen_count, 'e', epoch, 't', now, 'a', origin)
  end
  return seq
end

for k = 1, items do
  local a = 3 * k
  local index = tonumber(arg[a])
  local want = tonumber(arg[a + 1])
  local status, value, changed = 0, 0, 0
  -- Never trust the caller: a bad index must not grow the bitset.
  if not index or index ~= math.floor(index) or index < 0 or index >= size then
    status = -1
  else
    value = redis.call('GETBIT', KEYS[2], index)
    -- frozen_count is the frozen bitset's ones (every script that sets a frozen
    -- bit counts it): while nothing is frozen, the frozen bitset need not be read.
    if frozen_count > 0 and redis.call('GETBIT', KEYS[3], index) == 1 then
      status = -2
    elseif value ~= want then
      if not now then
        local t = redis.call('TIME')
        now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
      end
      if want == 1 then
        if max_checked > 0 and count >= max_checked then
          status = -3
        else
          redis.call('SETBIT', KEYS[2], index, 1)
          count = count + 1
          redis.call('ZADD', KEYS[8], now, index)
          status, value, changed = 1, 1, append(index, '1', arg[a + 2])
        end
      else
        -- Unchecking: too late if the box has been checked for freeze_after ms (the sunset rule).
        local since = now
        if freeze_after > 0 then
          since = tonumber(redis.call('ZSCORE', KEYS[8], index) or now)
        end
        if freeze_after > 0 and now - since >= freeze_after then
          redis.call('SETBIT', KEYS[3], index, 1)
          frozen_count = frozen_count + 1
          redis.call('ZREM', KEYS[8], index)
          status, changed = -2, append(index, 'f', arg[a + 2])
        else
          redis.call('SETBIT', KEYS[2], index, 0)
          count = count - 1
          redis.call('ZREM', KEYS[8], index)
          status, value, changed = 1, 0, append(index, '0', arg[a + 2])
        end
      end
    end
  end
  answers[a - 1] = status
  answers[a] = value
  answers[a + 1] = changed
end

if seq == seq_before then
  return answers
end
-- What every item would repeat, written once per call.
if count ~= count_before then
  redis.call('INCRBY', KEYS[4], count - count_before)
end
if frozen_count ~= frozen_before then
  redis.call('INCRBY', KEYS[5], frozen_count - frozen_before)
end
redis.call('INCRBY', KEYS[6], seq - seq_before)
-- Only answers that changed the board are stored (see KEYS[9]); a plain
-- string, as cjson costs more than the rest of a small call.
redis.call('SET', KEYS[9], table.concat(answers, ','), 'PX', ARGV[2])
return answers
