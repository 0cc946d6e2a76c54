-- KEYS[1] job hash, KEYS[2] index, KEYS[3] owner index, KEYS[4] owner active set, KEYS[5..] the job's other keys.
-- ARGV[1] job id. Returns -1 absent, 0 still queued or running (nothing removed), 1 deleted.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return -1 end
if status == 'queued' or status == 'running' then return 0 end
redis.call('DEL', unpack(KEYS, 5))
redis.call('DEL', KEYS[1])
track_status(KEYS[1], status, false, 0)
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('SREM', KEYS[4], ARGV[1])
return 1
