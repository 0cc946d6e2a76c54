-- KEYS[1] record. ARGV[1] the claimant's job id. Deletes the record only while it is still that claimant's.
local raw = redis.call('GET', KEYS[1])
if raw and cjson.decode(raw)['job_id'] == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
