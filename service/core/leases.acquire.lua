-- KEYS[1] lease, KEYS[2] leases. ARGV[1] member, ARGV[2] token, ARGV[3] lease ms, ARGV[4] key ttl s,
-- ARGV[5] the holder's token to take over ('' for none). Returns 1 when acquired, else the live holder's token.
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[2] and holder ~= ARGV[5] and not is_marker(holder) then
  local expiry = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[1]) or '0')
  if expiry > now then return holder end
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[4])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
return 1
