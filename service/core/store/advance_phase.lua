-- KEYS[1] job hash. ARGV[1] the phase, ARGV[2] its rank, ARGV[3..] every phase in order. Only moves forward, and
-- only while the job runs: chunks of one job report phases in parallel.
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
local current = redis.call('HGET', KEYS[1], 'phase') or 'queued'
local rank = 0
for i = 3, #ARGV do if ARGV[i] == current then rank = i - 3 end end
if tonumber(ARGV[2]) <= rank then return 0 end
redis.call('HSET', KEYS[1], 'phase', ARGV[1])
return 1
