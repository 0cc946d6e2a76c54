-- KEYS[1] progress hash, ARGV[1] chunk index, ARGV[2] done, ARGV[3] ttl. Returns the sum over chunks.
local previous = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > previous then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
redis.call('EXPIRE', KEYS[1], ARGV[3])
local sum = 0
for _, value in ipairs(redis.call('HVALS', KEYS[1])) do sum = sum + tonumber(value) end
return sum
