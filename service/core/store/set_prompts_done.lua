-- KEYS[1] job hash. ARGV[1] prompts done.
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'prompts_done', ARGV[1])
return 1
