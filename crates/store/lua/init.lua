-- Creates the board once, or returns the one that exists.
-- KEYS[1]: {B}:config        hash: size, max_checked (0 = none), freeze_after_ms (0 = off), epoch
-- KEYS[2]: {B}:bits          checked bitset
-- KEYS[3]: {B}:frozen        frozen bitset
-- KEYS[4]: {B}:count         checked boxes
-- KEYS[5]: {B}:frozen_count  frozen boxes
-- KEYS[6]: {B}:seq           seq of the last change
-- KEYS[7]: {B}:log           change stream
-- KEYS[8]: {B}:checked_at    sorted set: index -> ms of last check
-- ARGV[1]: size
-- ARGV[2]: max_checked (0 = no limit)
-- ARGV[3]: freeze_after_ms (0 = off)
-- ARGV[4]: epoch to use if the board is created (random, non-zero)
-- Returns: {created (1 = this call created the board, 0 = it existed), size, max_checked, freeze_after_ms, epoch}
--   The board that exists wins: its settings are returned, not ARGV's.
-- Errors: "BOARDSIZE ..." when the board exists with another size (never resized).

local existing = redis.call('HMGET', KEYS[1], 'size', 'max_checked', 'freeze_after_ms', 'epoch')
if existing[1] then
  if existing[1] ~= ARGV[1] then
    return redis.error_reply('BOARDSIZE the board has ' .. existing[1] .. ' boxes; refusing to resize it to ' .. ARGV[1])
  end
  return {0, tonumber(existing[1]), tonumber(existing[2]), tonumber(existing[3]), existing[4]}
end

-- A new board: drop anything a lost board left behind, so seq, log and bits agree.
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8])
redis.call('HSET', KEYS[1], 'size', ARGV[1], 'max_checked', ARGV[2], 'freeze_after_ms', ARGV[3], 'epoch', ARGV[4])
return {1, tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]}
