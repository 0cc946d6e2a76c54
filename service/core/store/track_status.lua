-- Jobs by status, kept as each change happens (for /metrics): a sorted set per state, `{prefix}by-status:{state}`,
-- whose members are job ids scored with when the job's hash expires (unix seconds, Redis's clock). Every script that
-- changes a job's status moves the job between the sets (the sets' names come from the job hash's own
-- `{prefix}job:{id}`), so counting is a ZCOUNT of the unexpired members of each set: a few commands a scrape
-- instead of a read of every job (service/core/store/job_listing.py). Fine on one Redis (not Cluster), like
-- create_capped's key names. `from` or `to` false: the job appears or goes.
local function track_status(job_key, from, to, ttl)
  local base, id = string.match(job_key, '^(.*)job:([^:]*)$')
  if from then redis.call('ZREM', base .. 'by-status:' .. from, id) end
  if to then
    local now = redis.call('TIME')
    redis.call('ZADD', base .. 'by-status:' .. to, tonumber(now[1]) + tonumber(ttl), id)
  end
end
