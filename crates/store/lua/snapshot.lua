-- Reads the whole board atomically.
-- KEYS[1]: {B}:config        hash: size, max_checked, freeze_after_ms, epoch
-- KEYS[2]: {B}:bits          checked bitset
-- KEYS[3]: {B}:frozen        frozen bitset
-- KEYS[4]: {B}:count         checked boxes
-- KEYS[5]: {B}:frozen_count  frozen boxes
-- KEYS[6]: {B}:seq           seq of the last change (= the log entry id "<seq>-0" the state includes)
-- Returns: {bits, frozen, count, frozen_count, seq, epoch, size, max_checked, freeze_after_ms}
--   bits and frozen are as Redis stores them: possibly shorter than size/8 bytes
--   (Redis only allocates up to the highest bit ever set); the reader pads with zeros.
-- Errors: "NOBOARD" when the board does not exist.

local config = redis.call('HMGET', KEYS[1], 'size', 'max_checked', 'freeze_after_ms', 'epoch')
if not config[1] then
  return redis.error_reply('NOBOARD board does not exist')
end
return {
  redis.call('GET', KEYS[2]) or '',
  redis.call('GET', KEYS[3]) or '',
  tonumber(redis.call('GET', KEYS[4]) or '0'),
  tonumber(redis.call('GET', KEYS[5]) or '0'),
  redis.call('GET', KEYS[6]) or '0',
  config[4],
  tonumber(config[1]),
  tonumber(config[2]),
  tonumber(config[3]),
}
