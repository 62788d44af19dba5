-- Release a step lock only if we still hold it, and clear the job's `running` mark.
-- KEYS[1] = lock key, KEYS[2] = job hash; ARGV[1] = our token
if redis.call("GET", KEYS[1]) == ARGV[1] then
  redis.call("DEL", KEYS[1])
end
if redis.call("EXISTS", KEYS[2]) == 1 then
  redis.call("HDEL", KEYS[2], "running")
end
return 1
