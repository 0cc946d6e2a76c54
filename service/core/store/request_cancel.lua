-- KEYS[1] job hash, KEYS[2] cancel flag, KEYS[3] chunks_done. ARGV[1] now, ARGV[2] ttl, ARGV[3] partial key prefix.
-- Returns -1 absent, 0 unchanged, 1 cancelled.
-- Uses drop_partials (drop_partials.lua, put in front of this script when it is loaded).
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return -1 end
if status ~= 'queued' and status ~= 'running' then return 0 end
redis.call('SET', KEYS[2], '1', 'EX', ARGV[2])
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
track_status(KEYS[1], status, 'cancelled', ARGV[2])
drop_partials(KEYS[3], ARGV[3])
return 1
