-- KEYS[1] lease, KEYS[2] leases. ARGV[1] member, ARGV[2] marker, ARGV[3] ms until looked at, ARGV[4] key ttl s.
-- Marks a chunk just sent (never started) unless a run holds it. Returns 1 when marked.
local holder = redis.call('GET', KEYS[1])
if holder and not is_marker(holder) then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[4])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
return 1
