-- What a job's end announces: decided once per ending, the same answer when asked again.
-- KEYS[1] = job hash, KEYS[2] = ENDED zset, KEYS[3] = batch hash (or "" for none)
-- ARGV[1] = job id
-- Only a job still in ENDED is announced: asking again after its messages went out is a no-op.
-- Returns {job?, batch?}: "job" when the job has a callback_url or on_done, "batch" when this
-- job was the last of its batch and the batch has a callback_url. The batch's `open` counter
-- goes down once per job ending (`batch_counted` guards it), whoever asks.
if redis.call("EXISTS", KEYS[1]) == 0 or not redis.call("ZSCORE", KEYS[2], ARGV[1]) then
  -- its record expired, or its end was announced already (it left ENDED after its messages)
  redis.call("ZREM", KEYS[2], ARGV[1])
  return {}
end
local out = {}
local f = redis.call("HMGET", KEYS[1], "callback_url", "on_done", "batch_id")
if (f[1] and f[1] ~= "") or (f[2] and f[2] ~= "") then
  out[#out + 1] = "job"
end
if KEYS[3] ~= "" and f[3] and f[3] ~= "" then
  if redis.call("HSETNX", KEYS[1], "batch_counted", "1") == 1 then
    local left = redis.call("HINCRBY", KEYS[3], "open", -1)
    if left == 0 then
      redis.call("HSET", KEYS[1], "batch_last", "1")
      redis.call("HSET", KEYS[3], "finished_at", redis.call("HGET", KEYS[1], "finished_at") or "")
    end
  end
  if redis.call("HGET", KEYS[1], "batch_last") == "1" then
    local cb = redis.call("HGET", KEYS[3], "callback_url")
    if cb and cb ~= "" then
      out[#out + 1] = "batch"
    end
  end
end
return out
