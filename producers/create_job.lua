-- Create job records atomically, honouring idempotency keys: several jobs per call, so that a
-- batch costs a few script calls rather than one per job.
-- KEYS[1] = index zset, KEYS[2] = active zset (jobs not yet finished)
-- ARGV[1] = idempotency key ttl (s), ARGV[2] = the job record keys' prefix (producers.keys), then per job:
--   job id, created_at (score), idempotency key name (or "" for none), N, then N field/value items
-- Returns {job_id, created (1|0), ...} per job: an existing job id when its key was already used.
local out = {}
local prefix = ARGV[2]
local i = 3
while i <= #ARGV do
  local job_id, created_at, idem, n = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  local first, last = i + 4, i + 3 + n
  i = last + 1
  local existing = false
  if idem ~= "" then
    existing = redis.call("GET", idem)
    if existing and redis.call("EXISTS", prefix .. existing) == 0 then
      existing = false
    end
  end
  if existing then
    out[#out + 1] = existing
    out[#out + 1] = 0
  else
    redis.call("HSET", prefix .. job_id, unpack(ARGV, first, last))
    if idem ~= "" then
      redis.call("SET", idem, job_id, "EX", tonumber(ARGV[1]))
    end
    redis.call("ZADD", KEYS[1], tonumber(created_at), job_id)
    redis.call("ZADD", KEYS[2], tonumber(created_at), job_id)
    out[#out + 1] = job_id
    out[#out + 1] = 1
  end
end
return out
