-- Takes or renews a lease (one freeze sweeper, or one change archiver, at a time across the fleet).
-- KEYS[1]: {B}:sweep_lease   the holder's id, with a TTL ({B}:archive_lease for the archiver)
-- ARGV[1]: the caller's id
-- ARGV[2]: lease length in ms
-- Returns: 1 when the caller holds the lease after this call, 0 when someone else does.

if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
return 0
