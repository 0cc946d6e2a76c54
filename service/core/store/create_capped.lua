-- Registers a job and, with a cap, only when its owner has fewer than the cap of queued or running jobs: one script,
-- so two concurrent submits can never both take the last slot. The owner's active set is pruned on the way (jobs
-- that ended or expired leave it), which keeps the count right however the worker moves jobs on.
-- The job hashes of active members are read by key names built here from ARGV[5]: fine on one Redis (not Cluster).
-- KEYS[1] job hash, KEYS[2] index, KEYS[3] owner index, KEYS[4] owner active set, KEYS[5] unplanned set,
-- KEYS[6] the job's event stream.
-- ARGV[1] job id, ARGV[2] ttl, ARGV[3] score, ARGV[4] cap (0: none), ARGV[5] job key prefix,
-- ARGV[6] when to send again if not planned by then, ARGV[7] the first event (the status, JSON), ARGV[8] the
-- stream's cap, ARGV[9..] fields.
-- Returns -1 when created (and its first event appended), else the owner's active count (nothing written).
local cap = tonumber(ARGV[4])
if cap > 0 then
  local active = 0
  for _, id in ipairs(redis.call('SMEMBERS', KEYS[4])) do
    local status = redis.call('HGET', ARGV[5] .. id, 'status')
    if status == 'queued' or status == 'running' then
      active = active + 1
    else
      redis.call('SREM', KEYS[4], id)
    end
  end
  if active >= cap then return active end
end
redis.call('HSET', KEYS[1], unpack(ARGV, 9))
redis.call('EXPIRE', KEYS[1], ARGV[2])
track_status(KEYS[1], false, 'queued', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
redis.call('EXPIRE', KEYS[4], ARGV[2])
redis.call('ZADD', KEYS[5], ARGV[6], ARGV[1])
redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[8], '*', 'status', ARGV[7])
redis.call('EXPIRE', KEYS[6], ARGV[2])
return -1
