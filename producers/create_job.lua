-- Create a job record atomically, honouring an idempotency key.
-- KEYS[1] = job hash, KEYS[2] = idempotency key (or "" for none), KEYS[3] = index zset,
-- KEYS[4] = active zset (jobs not yet finished)
-- ARGV[1] = job id, ARGV[2] = created_at (score), ARGV[3] = idempotency key ttl (s),
-- ARGV[4..] = field, value pairs
-- Returns {job_id, created (1|0)}: an existing job id when the key was already used.
if KEYS[2] ~= "" then
  local existing = redis.call("GET", KEYS[2])
  if existing then
    if redis.call("EXISTS", "awork:job:" .. existing) == 1 then
      return {existing, 0}
    end
  end
end
local fields = {}
for i = 4, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
redis.call("HSET", KEYS[1], unpack(fields))
if KEYS[2] ~= "" then
  redis.call("SET", KEYS[2], ARGV[1], "EX", tonumber(ARGV[3]))
end
redis.call("ZADD", KEYS[3], tonumber(ARGV[2]), ARGV[1])
redis.call("ZADD", KEYS[4], tonumber(ARGV[2]), ARGV[1])
return {ARGV[1], 1}
