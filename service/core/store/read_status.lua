-- KEYS[1] job hash, KEYS[2] result. ARGV the fields to read (STATUS_FIELDS: the status first).
-- Returns {values, 1 when the job succeeded and its result exists else 0}: one command for a poll.
local values = redis.call('HMGET', KEYS[1], unpack(ARGV))
local has_result = 0
if values[1] == 'succeeded' then has_result = redis.call('EXISTS', KEYS[2]) end
return {values, has_result}
