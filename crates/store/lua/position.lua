-- Reads where the board is, atomically: the change feed's continuity check.
-- KEYS[1]: {B}:config        hash: size, max_checked, freeze_after_ms, epoch
-- KEYS[2]: {B}:seq           seq of the last change
-- KEYS[3]: {B}:log           change stream (entries as in set.lua)
-- ARGV[1]: a seq whose log entry to return (the last change the caller applied; 0 = none)
-- ARGV[2]: another such seq (the highest change the caller acknowledged; 0 = none)
-- Returns: {epoch (nil when the board does not exist), seq, entries at ARGV[1], entries at ARGV[2]}
--   Each entries item is an XRANGE reply: empty when the seq is 0, trimmed away or never written.
--   One script, so epoch and seq are of the same moment (an HGET then a GET could
--   straddle a FLUSHALL and pair one board's epoch with another's seq).

local function entry(seq)
  if seq == '0' then
    return {}
  end
  return redis.call('XRANGE', KEYS[3], seq .. '-0', seq .. '-0')
end

return {
  redis.call('HGET', KEYS[1], 'epoch') or false,
  redis.call('GET', KEYS[2]) or '0',
  entry(ARGV[1]),
  entry(ARGV[2]),
}
