-- A rendered figure is cached only while its job's result is still there, and for no longer than the result:
-- checked and written in one script, so a job deleted while its figure rendered leaves no figure behind (the render
-- takes seconds; a check before it and a write after it would let the delete slip in between).
-- KEYS[1] the figure, KEYS[2] the job's set of figure keys, KEYS[3] the result. ARGV[1] the figure's bytes,
-- ARGV[2] the TTL (ms) when the result has none, ARGV[3] a margin (ms). Returns 1 cached, 0 the result is gone.
local ttl = redis.call('PTTL', KEYS[3])
if ttl == -2 then return 0 end
if ttl == -1 then ttl = tonumber(ARGV[2]) else ttl = math.max(1, ttl - tonumber(ARGV[3])) end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
redis.call('SADD', KEYS[2], KEYS[1])
redis.call('PEXPIRE', KEYS[2], ttl)
return 1
