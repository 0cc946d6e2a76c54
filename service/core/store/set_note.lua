-- KEYS[1] job hash. ARGV[1] note. A note on an active job only (never re-creates an expired hash).
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'note', ARGV[1])
return 1
