-- KEYS[1] leases. ARGV[1] lease key prefix, ARGV[2] batch, ARGV[3] ms until a requeued chunk is looked at again,
-- ARGV[4] key ttl s. Marks every expired lease "requeued" (it stays in the set, so a sweep that dies before
-- sending is repeated) and returns member, previous holder, member, previous holder, ... Lease keys are built
-- here from ARGV[1]: fine on one Redis.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, member in ipairs(due) do
  local key = ARGV[1] .. member
  table.insert(out, member)
  table.insert(out, redis.call('GET', key) or '')
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), member)
  redis.call('SET', key, 'requeued:' .. now, 'EX', ARGV[4])
end
return out
