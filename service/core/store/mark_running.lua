-- KEYS[1] job hash, KEYS[2] cancel flag. ARGV[1] now (ISO), ARGV[2] ttl seconds.
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
track_status(KEYS[1], 'queued', 'running', ARGV[2])
return 1
