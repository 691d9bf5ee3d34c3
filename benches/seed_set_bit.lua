-- The seed's toggle (one-million-checkboxes.txt, "set_bit_script"), with its
-- PUBLISH moved inside so one EVALSHA does a toggle's whole Redis work, as the
-- baseline that scripts/bench's redis_cpu part compares omcb's set.lua with.
-- KEYS[1]: bitset, KEYS[2]: count, KEYS[3]: the channel both servers subscribe to
-- ARGV[1]: index, ARGV[2]: value (0 or 1), ARGV[3]: the message, JSON built by
-- the caller (the seed's Flask server ran json.dumps)
-- Returns the change of the count (-1, 0 or 1).
local index = tonumber(ARGV[1])
local value = tonumber(ARGV[2])
local current = redis.call('GETBIT', KEYS[1], index)
local diff = value - current
redis.call('SETBIT', KEYS[1], index, value)
redis.call('INCRBY', KEYS[2], diff)
redis.call('PUBLISH', KEYS[3], ARGV[3])
return diff
