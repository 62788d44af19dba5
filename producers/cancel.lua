-- Cancel a job, atomically with respect to the steps (which take their lock and read the record
-- in one round trip, workers/step_lock.py).
-- KEYS[1] = job hash, KEYS[2] = active zset, KEYS[3] = dead zset, KEYS[4] = ended zset,
-- KEYS[5..#KEYS-1] = the step locks (one per step, producers.contract.STEP_TASKS),
-- KEYS[#KEYS] = events channel
-- ARGV[1] = job id, ARGV[2] = now, ARGV[3] = record ttl (s)
-- Returns {outcome, state}: missing | ended | linked | requested | canceled
local state = redis.call("HGET", KEYS[1], "state")
if not state then
  return {"missing", ""}
end
if state == "canceled" then
  return {"canceled", state}
end
if state == "done" or state == "failed" or state == "dead" then
  return {"ended", state}
end
local f = redis.call("HMGET", KEYS[1], "file_id", "link_sent_for", "multipart_sent", "notify",
  "version_sent", "byurl_sent")
if (f[1] and f[1] ~= "") or (f[2] and f[2] ~= "") or f[3] == "1" or f[5] == "1" or f[6] == "1" then
  return {"linked", state}
end
for i = 5, #KEYS - 1 do
  if redis.call("EXISTS", KEYS[i]) == 1 then
    -- a step runs: it stops at its next block or fence check (or ends first)
    redis.call("HSET", KEYS[1], "cancel_requested", "1", "updated_at", ARGV[2])
    return {"requested", state}
  end
end
redis.call("HSET", KEYS[1], "state", "canceled", "cancel_requested", "1", "finished_at", ARGV[2],
  "updated_at", ARGV[2])
redis.call("HDEL", KEYS[1], "upload_url", "running")
redis.call("EXPIRE", KEYS[1], tonumber(ARGV[3]))
redis.call("ZREM", KEYS[2], ARGV[1])
redis.call("ZREM", KEYS[3], ARGV[1])
if f[4] == "1" then
  redis.call("ZADD", KEYS[4], tonumber(ARGV[2]), ARGV[1])
end
redis.call("PUBLISH", KEYS[#KEYS], cjson.encode({id = ARGV[1], state = "canceled"}))
return {"canceled", state}
