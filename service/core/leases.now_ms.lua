-- Helpers every lease script starts with: `now` in ms from the server clock, and is_marker(holder): true for
-- the placeholder of a chunk sent but not started (queued: / requeued:), not a run's token.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function is_marker(holder)
  return string.sub(holder, 1, 7) == 'queued:' or string.sub(holder, 1, 9) == 'requeued:'
end
