-- KEYS[1] job hash, KEYS[2] lease. ARGV[1] token, ARGV[2] error, ARGV[3] now (ISO), ARGV[4] ttl.
-- Fails a queued or running job only while this run still holds (or nobody holds) the chunk's lease.
-- Returns 1 failed, 0 the job had ended, -1 the lease belongs to another run.
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return -1 end
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'failed', 'error', ARGV[2], 'finished_at', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
track_status(KEYS[1], status, 'failed', ARGV[4])
return 1
