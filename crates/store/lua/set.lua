-- Sets one box to a value (set, not flip) and records the change, atomically.
-- KEYS[1]: {B}:config        hash: size, max_checked, freeze_after_ms, epoch
-- KEYS[2]: {B}:bits          checked bitset
-- KEYS[3]: {B}:frozen        frozen bitset
-- KEYS[4]: {B}:count         checked boxes
-- KEYS[5]: {B}:frozen_count  frozen boxes
-- KEYS[6]: {B}:seq           seq of the last change
-- KEYS[7]: {B}:log           change stream; entry id "<seq>-0", fields i (index), o ("1", "0" or "f"), c, f (counts after), e (the board's epoch), t (commit time, ms, from TIME), a (the origin: 16 hex digits, absent when ARGV[5] is empty)
-- KEYS[8]: {B}:checked_at    sorted set: index -> ms of last check, for checked unfrozen boxes
-- KEYS[9]: {B}:op:<id>       this call's answer when it changed the board, kept so a retried call (the
--                            Redis client resending after a reconnect) gets the same answer. A call that
--                            changed nothing stores none: running it again is as if its first run never
--                            happened, so the retry's answer is the call's answer, at the retry's moment.
-- ARGV[1]: index
-- ARGV[2]: value, "1" or "0"
-- ARGV[3]: approximate MAXLEN of the log
-- ARGV[4]: ms to remember the answer under KEYS[9]
-- ARGV[5]: the change's origin (keyed hash of the client's address) as 16 hex digits, or "" for none
-- The answer under KEYS[9] is "status,value,seq,checked_count,frozen_count,epoch".
-- Returns: {status, value, seq, checked_count, frozen_count, epoch}
--   status  1: changed, seq is the change's
--   status  0: the box already had the value; seq 0
--   status -1: index out of range (value 0, seq 0)
--   status -2: frozen; seq > 0 when this call froze it (an uncheck after freeze_after_ms)
--   status -3: board full (max_checked boxes are checked)
--   value: the box's value now
--   epoch: the board's epoch (a string: Lua numbers would lose digits), so the
--     caller knows which board a seq belongs to
-- Errors: "NOBOARD" when the board does not exist (the caller creates it: a new epoch).
-- Each log entry carries the epoch it was written in: a reader never takes another
-- board's entries (after FLUSHALL or a rollback moved the epoch) as its own.

-- One call for this call's stored answer and both counts: a script's cost
-- here is mostly per redis.call.
local got = redis.call('MGET', KEYS[9], KEYS[4], KEYS[5])
local done = got[1]
if done then
  local status, value, seq, c, f, e = string.match(done, '^(-?%d+),(%d+),(%d+),(%d+),(%d+),(%d+)$')
  return {tonumber(status), tonumber(value), tonumber(seq), tonumber(c), tonumber(f), e}
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

-- Only an answer that changed the board is stored (see KEYS[9]); a plain
-- string, as cjson costs more than the rest of a no-op call.
local function answer(status, value, seq)
  if seq > 0 then
    redis.call('SET', KEYS[9], table.concat({status, value, seq, count, frozen_count, epoch}, ','),
      'PX', ARGV[4])
  end
  return {status, value, seq, count, frozen_count, epoch}
end

-- Never trust the caller: a bad index must not grow the bitset.
local index = tonumber(ARGV[1])
if not index or index ~= math.floor(index) or index < 0 or index >= size then
  return answer(-1, 0, 0)
end
local want = tonumber(ARGV[2])
if want ~= 0 and want ~= 1 then
  return redis.error_reply('BADVALUE value must be 0 or 1')
end

local current = redis.call('GETBIT', KEYS[2], index)
-- frozen_count is the frozen bitset's ones (every script that sets a frozen bit
-- counts it): while nothing is frozen, the frozen bitset need not be read.
if frozen_count > 0 and redis.call('GETBIT', KEYS[3], index) == 1 then
  return answer(-2, current, 0)
end
if current == want then
  return answer(0, current, 0)
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function append(op)
  local seq = redis.call('INCR', KEYS[6])
  if ARGV[5] ~= '' then
    redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[3], seq .. '-0',
      'i', index, 'o', op, 'c', count, 'f', frozen_count, 'e', epoch, 't', now, 'a', ARGV[5])
  else
    redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[3], seq .. '-0',
      'i', index, 'o', op, 'c', count, 'f', frozen_count, 'e', epoch, 't', now)
  end
  return seq
end

if want == 1 then
  if max_checked > 0 and count >= max_checked then
    return answer(-3, 0, 0)
  end
  redis.call('SETBIT', KEYS[2], index, 1)
  count = redis.call('INCR', KEYS[4])
  redis.call('ZADD', KEYS[8], now, index)
  return answer(1, 1, append('1'))
end

-- Unchecking: too late if the box has been checked for freeze_after ms (the sunset rule).
if freeze_after > 0 then
  local since = tonumber(redis.call('ZSCORE', KEYS[8], index) or now)
  if now - since >= freeze_after then
    redis.call('SETBIT', KEYS[3], index, 1)
    frozen_count = redis.call('INCR', KEYS[5])
    redis.call('ZREM', KEYS[8], index)
    return answer(-2, 1, append('f'))
  end
end
redis.call('SETBIT', KEYS[2], index, 0)
count = redis.call('DECR', KEYS[4])
redis.call('ZREM', KEYS[8], index)
return answer(1, 0, append('0'))
