-- Writes a worker's replica back as the board, under a new epoch, because Redis
-- lost acknowledged changes (a restore of older files, an AOF that lost its
-- last second, a failover to a lagging replica, a restart with no data, a
-- FLUSHALL). Compare-and-set: only while the board still has the epoch that
-- lost changes, or is gone, so the board is restored once however many
-- workers notice; the others take the restored board.
-- KEYS[1]: {B}:config        hash: size, max_checked, freeze_after_ms, epoch, restored_from_epoch, restored_from_seq
-- KEYS[2]: {B}:bits          checked bitset
-- KEYS[3]: {B}:frozen        frozen bitset
-- KEYS[4]: {B}:count         checked boxes
-- KEYS[5]: {B}:frozen_count  frozen boxes
-- KEYS[6]: {B}:seq           seq of the last change
-- KEYS[7]: {B}:log           change stream (deleted: the new epoch starts a fresh log)
-- KEYS[8]: {B}:checked_at    sorted set: index -> ms of last check
-- ARGV[1]: the epoch that lost changes (the board may be replaced only while it has this one)
-- ARGV[2]: a new random non-zero epoch
-- ARGV[3]: size
-- ARGV[4]: max_checked (0 = no limit)
-- ARGV[5]: freeze_after_ms (0 = off)
-- ARGV[6]: checked bitset (Redis bit order)
-- ARGV[7]: frozen bitset
-- ARGV[8]: checked boxes
-- ARGV[9]: frozen boxes
-- ARGV[10]: the replica's seq (of the epoch in ARGV[1])
-- and from ARGV[11] on, the checked unfrozen boxes when freezing is on: their check
--   time stays what Redis still has, else it becomes now (the replica does not
--   know it: such a box freezes up to freeze_after_ms later than it would have)
-- Returns: {restored (1 = this call wrote the replica, 0 = the board has another epoch), the board's epoch now}
-- The new seq is max(ARGV[10], Redis' seq), so it never goes back; the new
-- epoch makes the seqs of the old one incomparable anyway.
-- Errors: "BOARDSIZE ..." when the board in Redis has another size.

local config = redis.call('HMGET', KEYS[1], 'size', 'epoch')
if config[2] and config[2] ~= ARGV[1] then
  return {0, config[2]}
end
if config[1] and config[1] ~= ARGV[3] then
  return redis.error_reply('BOARDSIZE the board has ' .. config[1] .. ' boxes; refusing to restore ' .. ARGV[3])
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local times = {}
local boxes = ARGV
for i = 11, #boxes do
  times[#times + 1] = redis.call('ZSCORE', KEYS[8], boxes[i]) or now
  times[#times + 1] = boxes[i]
end

local seq = tonumber(ARGV[10])
local have = tonumber(redis.call('GET', KEYS[6]) or '0')
if have > seq then
  seq = have
end

redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8])
redis.call('SET', KEYS[2], ARGV[6])
redis.call('SET', KEYS[3], ARGV[7])
redis.call('SET', KEYS[4], ARGV[8])
redis.call('SET', KEYS[5], ARGV[9])
redis.call('SET', KEYS[6], string.format('%d', seq))
-- ZADD in slices: Lua's unpack has a stack limit.
for i = 1, #times, 2000 do
  redis.call('ZADD', KEYS[8], unpack(times, i, math.min(i + 1999, #times)))
end
redis.call('HSET', KEYS[1], 'size', ARGV[3], 'max_checked', ARGV[4], 'freeze_after_ms', ARGV[5],
  'epoch', ARGV[2], 'restored_from_epoch', ARGV[1], 'restored_from_seq', ARGV[10])
return {1, ARGV[2]}
