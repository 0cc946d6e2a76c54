-- KEYS[1] job hash. ARGV[1] done, ARGV[2] total.
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'done', ARGV[1], 'total', ARGV[2])
return 1
