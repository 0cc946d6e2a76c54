-- Jobs stored before the by-status sets existed (track_status.lua) are added to them once, batch by batch.
-- ARGV[1] job key prefix, ARGV[2] set name prefix ("{prefix}by-status:"), ARGV[3..] job ids.
local now = tonumber(redis.call('TIME')[1])
for i = 3, #ARGV do
  local key = ARGV[1] .. ARGV[i]
  local status = redis.call('HGET', key, 'status')
  local ttl = redis.call('TTL', key)
  if status and ttl > 0 then redis.call('ZADD', ARGV[2] .. status, now + ttl, ARGV[i]) end
end
return 1
