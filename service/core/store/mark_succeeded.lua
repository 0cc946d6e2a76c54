-- KEYS[1] job hash, KEYS[2] result. ARGV[1] result bytes, ARGV[2] now, ARGV[3] ttl.
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[3])
local total = redis.call('HGET', KEYS[1], 'total') or '0'
redis.call('HSET', KEYS[1], 'status', 'succeeded', 'finished_at', ARGV[2], 'done', total)
redis.call('EXPIRE', KEYS[1], ARGV[3])
track_status(KEYS[1], 'running', 'succeeded', ARGV[3])
return 1
