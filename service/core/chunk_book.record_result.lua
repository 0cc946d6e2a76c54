-- KEYS[1] chunk result, KEYS[2] chunks_done hash, KEYS[3] the chunk's lease (service/core/leases.py), KEYS[4] job hash.
-- ARGV[1] result, ARGV[2] index, ARGV[3] ttl, ARGV[4] the recording run's lease token ('' records unfenced).
-- Returns the number of chunks done when this call recorded the chunk first, -1 for a chunk recorded before or a
-- job that has ended (its partials were dropped when it ended, see service/core/store/jobs.py, and none may appear afterwards),
-- -2 when another run holds the chunk's lease (this run is stale: it records nothing).
local status = redis.call('HGET', KEYS[4], 'status')
if status ~= 'queued' and status ~= 'running' then return -1 end
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then return -1 end
if ARGV[4] ~= '' then
  local holder = redis.call('GET', KEYS[3])
  if holder and holder ~= ARGV[4] then return -2 end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
redis.call('HSET', KEYS[2], ARGV[2], '1')
redis.call('EXPIRE', KEYS[2], ARGV[3])
return redis.call('HLEN', KEYS[2])
