-- Changes a board's live settings (`omcb admin`): today its freeze_after_ms,
-- the sunset. set.lua and sweep.lua read it on every call, so the change takes
-- effect with the next toggle; workers learn it by reading the hash each tick.
-- KEYS[1]: {B}:config        hash: size, max_checked, freeze_after_ms, epoch
-- ARGV[1]: freeze_after_ms (0 = off)
-- Returns: {size, max_checked, freeze_after_ms} after the change
-- Errors: "NOBOARD" when the board does not exist (a worker creates it; a
--   setting written into an empty hash would make init.lua see no board and
--   wipe it).

local size = redis.call('HGET', KEYS[1], 'size')
if not size then
  return redis.error_reply('NOBOARD board does not exist')
end
redis.call('HSET', KEYS[1], 'freeze_after_ms', ARGV[1])
local max_checked = redis.call('HGET', KEYS[1], 'max_checked') or '0'
return {tonumber(size), tonumber(max_checked), tonumber(ARGV[1])}
