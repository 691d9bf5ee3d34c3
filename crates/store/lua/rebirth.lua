-- Moves the board to a new epoch because Redis lost acknowledged changes (a
-- restore of older files, an AOF that lost its last second, a failover to a
-- lagging replica): compare-and-set on the epoch the caller saw, so the board
-- moves exactly once however many workers notice. Bits, counts, seq and log
-- stay: the new epoch is the board Redis still has, and seqs continue from
-- Redis' seq (seqs compare only within an epoch; log entries carry theirs).
-- KEYS[1]: {B}:config        hash: size, max_checked, freeze_after_ms, epoch
-- ARGV[1]: the epoch that lost changes
-- ARGV[2]: a new random non-zero epoch
-- Returns: {moved (1 = this call set ARGV[2], 0 = the epoch was no longer ARGV[1]), the board's epoch now}
-- Errors: "NOBOARD" when the board does not exist (creating it makes a new epoch anyway).

local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  return redis.error_reply('NOBOARD board does not exist')
end
if epoch == ARGV[1] then
  redis.call('HSET', KEYS[1], 'epoch', ARGV[2])
  return {1, ARGV[2]}
end
return {0, epoch}
