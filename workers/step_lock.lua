-- Release a step lock only if we still hold it, and clear the job's `running` mark unless
-- another holder has taken the step over (its mark is its own).
-- KEYS[1] = lock key, KEYS[2] = job hash; ARGV[1] = our token
local holder = redis.call("GET", KEYS[1])
if holder == ARGV[1] then
  redis.call("DEL", KEYS[1])
end
if holder == ARGV[1] or not holder then
  redis.call("HDEL", KEYS[2], "running")  -- a no-op on a record that is gone
end
return 1
