-- KEYS[1] job hash, KEYS[2] chunks_done. ARGV[1] error, ARGV[2] now, ARGV[3] ttl, ARGV[4] partial key prefix.
-- Uses drop_partials (drop_partials.lua, put in front of this script when it is loaded).
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'failed', 'error', ARGV[1], 'finished_at', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
track_status(KEYS[1], status, 'failed', ARGV[3])
drop_partials(KEYS[2], ARGV[4])
return 1
