-- A job that ends without a result keeps no chunk partials (they can be as large as the result): the partials of
-- the chunks recorded in the chunks_done hash are deleted in the same script that ends the job. The chunk
-- recorder (service/core/chunk_book.py) refuses to store a partial once the job has ended, so none can appear
-- afterwards.
-- KEYS[n] chunks_done hash, ARGV[m] partial key prefix ("{prefix}chunk:{id}:").
local function drop_partials(done_key, partial_prefix)
  for _, index in ipairs(redis.call('HKEYS', done_key)) do
    redis.call('DEL', partial_prefix .. index)
  end
end
