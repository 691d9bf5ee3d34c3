-- Freezes boxes that have been checked for freeze_after_ms, oldest first, at most ARGV[1] per call.
-- KEYS[1]: {B}:config        hash: size, max_checked, freeze_after_ms, epoch
-- KEYS[2]: {B}:frozen        frozen bitset
-- KEYS[3]: {B}:count         checked boxes (written into each log entry)
-- KEYS[4]: {B}:frozen_count  frozen boxes
-- KEYS[5]: {B}:seq           seq of the last change
-- KEYS[6]: {B}:log           change stream (entries as in set.lua, o = "f", e = the epoch, t = now)
-- KEYS[7]: {B}:checked_at    sorted set: index -> ms of last check
-- ARGV[1]: most boxes to freeze in this call
-- ARGV[2]: approximate MAXLEN of the log
-- Returns: the number of boxes frozen (0 when freezing is off or the board does not exist)
-- Cost: O(log n + frozen): it reads checked_at by score instead of scanning the bitset.

local config = redis.call('HMGET', KEYS[1], 'freeze_after_ms', 'epoch')
local freeze_after = tonumber(config[1] or '0')
local epoch = config[2]
if freeze_after <= 0 then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[7], '-inf', now - freeze_after, 'LIMIT', 0, tonumber(ARGV[1]))
local count = tonumber(redis.call('GET', KEYS[3]) or '0')
local frozen_count = tonumber(redis.call('GET', KEYS[4]) or '0')
for _, index in ipairs(due) do
  redis.call('SETBIT', KEYS[2], index, 1)
  frozen_count = redis.call('INCR', KEYS[4])
  redis.call('ZREM', KEYS[7], index)
  local seq = redis.call('INCR', KEYS[5])
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[2], seq .. '-0',
    'i', index, 'o', 'f', 'c', count, 'f', frozen_count, 'e', epoch, 't', now)
end
return #due
