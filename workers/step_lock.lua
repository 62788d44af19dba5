-- Release a step lock only if we still hold it, and clear the job's `running` mark unless
-- another holder has taken the step over (its mark is its own).
-- KEYS[1] = lock key, KEYS[2] = job hash; ARGV[1] = our token;
-- ARGV[2..] = field, value pairs: the step's last record update, written first in the same
-- round trip (to a record that still exists: a purged job is not brought back as a fragment).
if #ARGV > 1 and redis.call("EXISTS", KEYS[2]) == 1 then
  redis.call("HSET", KEYS[2], unpack(ARGV, 2))
end
local holder = redis.call("GET", KEYS[1])
if holder == ARGV[1] then
  redis.call("DEL", KEYS[1])
end
if holder == ARGV[1] or not holder then
  redis.call("HDEL", KEYS[2], "running")  -- a no-op on a record that is gone
end
return 1
