-- KEYS[1] lease, KEYS[2] leases. ARGV[1] member, ARGV[2] token ('' drops whoever holds it).
local holder = redis.call('GET', KEYS[1])
if ARGV[2] ~= '' and holder and holder ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
