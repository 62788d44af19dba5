-- Fleet-wide rate limiter for one awork workspace. Loaded by workers/ratelimit.py (EVALSHA).
--
-- Every decision runs atomically on the Redis server with the server's clock (TIME), so the
-- fleet agrees on one time and one count whatever the workers' clocks say.
--
-- KEYS (all in one hash slot: awork:rl:{workspace}:...)
--   1 minute log  (zset: member -> grant time in microseconds; "g<n>" ours, "o<n>" outside usage)
--   2 second log  (zset, same members/scores, kept for a shorter time)
--   3 pause       (hash: until, reason, since)
--   4 learned     (hash: m, s = awork's own x-ratelimit-limit-minute / -second)
--   5 seq         (counter that makes log members unique)
--   6 pace        (string: theoretical arrival time of the next evenly spaced request)
--
-- ARGV (common)
--   1 op: acquire | pause | observe | snapshot
--   2 now override in microseconds ("" = Redis TIME; tests only)
--   3 effective per-minute limit (configured, margin applied)
--   4 effective per-second limit (configured, margin applied)
--   5 margin (applied to limits learned from awork's headers)
--   6 configured per-minute limit (awork's figure, no margin)
--   7 configured per-second limit (awork's figure, no margin)
--
-- Rules enforced by acquire (a token is granted only if all hold, otherwise nothing is written
-- and the reply says how long until they would):
--   * no pause in force;
--   * fewer than Lm entries with a score in [now - 60 s, now]   (closed interval)
--   * fewer than Ls entries with a score in [now - 1 s, now]
--   * pacing: grants spaced 1/Ls apart on average, at most PACE_TOLERANCE ahead of schedule.
-- The closed intervals make "at most L in ANY interval of 60 s (resp. 1 s)" hold for every
-- placement of the interval, hence for awork's fixed windows whatever their alignment.

if redis.replicate_commands then
  -- Redis < 5 replicates scripts verbatim and refuses writes after TIME without this; from
  -- Redis 5 on effects replication is the default, and from 7 on this is a no-op.
  redis.replicate_commands()
end

local KM, KS, KP, KL, KQ, KT = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local unpack = unpack or table.unpack

local WM = 60000000          -- minute window, microseconds
local WS = 1000000           -- second window
local RET_M = WM + 10000000  -- how long minute-log entries are kept (window + observe look-back)
local RET_S = WS + 3000000
local FUTURE = WS            -- entries further in the future than this come from a clock step back

local function fmt(x)
  return string.format('%.0f', x)
end

local op = ARGV[1]
local now
if ARGV[2] ~= '' then
  now = tonumber(ARGV[2])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local cfg_m = tonumber(ARGV[3])
local cfg_s = tonumber(ARGV[4])
local margin = tonumber(ARGV[5])
local raw_m = tonumber(ARGV[6])
local raw_s = tonumber(ARGV[7])

local function trim()
  redis.call('ZREMRANGEBYSCORE', KM, '-inf', '(' .. fmt(now - RET_M))
  redis.call('ZREMRANGEBYSCORE', KM, '(' .. fmt(now + FUTURE), '+inf')
  redis.call('ZREMRANGEBYSCORE', KS, '-inf', '(' .. fmt(now - RET_S))
  redis.call('ZREMRANGEBYSCORE', KS, '(' .. fmt(now + FUTURE), '+inf')
end

-- The lower of the configured effective limit and awork's advertised limit with the margin.
local function effective(cfg, field)
  local learned = tonumber(redis.call('HGET', KL, field))
  if learned and learned > 0 then
    local l = math.max(1, math.floor(learned * margin + 1e-9))
    if l < cfg then
      return l
    end
  end
  return cfg
end

local function pause_until()
  local u = tonumber(redis.call('HGET', KP, 'until'))
  if u and u > now then
    return u
  end
  return nil
end

-- Set a pause of `dur` microseconds from now; an existing longer pause wins.
local function set_pause(dur, reason)
  local new_until = now + dur
  local cur = pause_until()
  if cur and cur >= new_until then
    return cur
  end
  redis.call('HSET', KP, 'until', fmt(new_until), 'reason', reason, 'since', fmt(now))
  redis.call('PEXPIRE', KP, math.ceil(dur / 1000) + 1000)
  return new_until
end

-- Add n entries at `now` to the given logs (outside usage).
local function add_outside(n, logs)
  local last = redis.call('INCRBY', KQ, n)
  redis.call('PEXPIRE', KQ, math.ceil(RET_M / 1000) + 1000)
  local first = last - n + 1
  local score = fmt(now)
  local i = first
  while i <= last do
    local args = {}
    local j = i
    while j <= last and j < i + 1000 do
      args[#args + 1] = score
      args[#args + 1] = 'o' .. j
      j = j + 1
    end
    for _, key in ipairs(logs) do
      redis.call('ZADD', key, unpack(args))
    end
    i = j
  end
  for _, key in ipairs(logs) do
    local ttl = RET_M
    if key == KS then ttl = RET_S end
    redis.call('PEXPIRE', key, math.ceil(ttl / 1000) + 1000)
  end
end

-- How long until fewer than `limit` entries lie in [t - window, t]; 0 if that holds now.
local function window_wait(key, window, limit, count)
  if count < limit then
    return 0
  end
  -- The (count - limit)-th entry (0-based, oldest first) is the last that must age out.
  local e = redis.call('ZRANGEBYSCORE', key, fmt(now - window), '+inf', 'WITHSCORES',
    'LIMIT', count - limit, 1)
  if #e < 2 then
    return 1
  end
  return math.max(1, tonumber(e[2]) + window - now + 1)
end

if op == 'acquire' then
  -- ARGV 8: pace tolerance in microseconds (0 = no pacing beyond the windows)
  local tol = tonumber(ARGV[8])
  trim()
  local lm = effective(cfg_m, 'm')
  local ls = effective(cfg_s, 's')
  local wait, why = 0, 'ok'

  local pu = pause_until()
  if pu then
    wait, why = pu - now, 'pause'
  end
  local cm = redis.call('ZCOUNT', KM, fmt(now - WM), '+inf')
  local w = window_wait(KM, WM, lm, cm)
  if w > wait then
    wait, why = w, 'minute'
  end
  local cs = redis.call('ZCOUNT', KS, fmt(now - WS), '+inf')
  w = window_wait(KS, WS, ls, cs)
  if w > wait then
    wait, why = w, 'second'
  end
  local interval = math.ceil(WS / ls)
  local tat = tonumber(redis.call('GET', KT))
  if tol > 0 and tat then
    w = tat - tol - now
    if w > wait then
      wait, why = w, 'pace'
    end
  end
  if wait > 0 then
    return {fmt(wait), why, fmt(now)}
  end

  local seq = redis.call('INCR', KQ)
  local member = 'g' .. seq
  local score = fmt(now)
  redis.call('ZADD', KM, score, member)
  redis.call('ZADD', KS, score, member)
  redis.call('PEXPIRE', KM, math.ceil(RET_M / 1000) + 1000)
  redis.call('PEXPIRE', KS, math.ceil(RET_S / 1000) + 1000)
  redis.call('PEXPIRE', KQ, math.ceil(RET_M / 1000) + 1000)
  if tol > 0 then
    local base = now
    if tat and tat > now then
      base = tat
    end
    local new_tat = base + interval
    redis.call('SET', KT, fmt(new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
  end
  return {'0', 'ok', fmt(now)}

elseif op == 'pause' then
  -- ARGV 8: duration in microseconds, 9: reason
  local u = set_pause(tonumber(ARGV[8]), ARGV[9])
  return {fmt(u), fmt(now)}

elseif op == 'observe' then
  -- ARGV 8: pause duration in microseconds ("" = no pause; "-1" = until the next minute
  --         boundary of the server clock, plus 1 s), 9: pause reason,
  --         10/11: x-ratelimit-limit-minute / -remaining-minute ("" = absent),
  --         12/13: x-ratelimit-limit-second / -remaining-second,
  --         14: "1" = learn outside usage from the remaining-* figures,
  --         15/16: look-back beyond the window for our own entries (minute / second), us,
  --         17: how long learned limits are kept, ms
  trim()
  local paused = ''
  if ARGV[8] ~= '' then
    local dur = tonumber(ARGV[8])
    if dur < 0 then
      dur = WM - (now % WM) + 1000000
    end
    paused = fmt(set_pause(dur, ARGV[9]))
  end

  local lim_m = tonumber(ARGV[10])
  local lim_s = tonumber(ARGV[12])
  if (lim_m and lim_m > 0) or (lim_s and lim_s > 0) then
    if lim_m and lim_m > 0 then redis.call('HSET', KL, 'm', fmt(lim_m)) end
    if lim_s and lim_s > 0 then redis.call('HSET', KL, 's', fmt(lim_s)) end
    redis.call('PEXPIRE', KL, tonumber(ARGV[17]))
  end

  local added_s, added_m = 0, 0
  if ARGV[14] == '1' then
    -- Second window first: its outside entries go to the second log only. The minute log
    -- learns from the minute figures, which already include those requests.
    local rem_s = tonumber(ARGV[13])
    local look_s = tonumber(ARGV[16])
    if rem_s and look_s <= RET_S - WS then
      local lim = lim_s or tonumber(redis.call('HGET', KL, 's')) or raw_s
      local used = math.min(lim, lim - rem_s)
      local ours = redis.call('ZCOUNT', KS, fmt(now - WS - look_s), '+inf')
      if used - ours > 0 then
        added_s = used - ours
        add_outside(added_s, {KS})
      end
    end
    local rem_m = tonumber(ARGV[11])
    local look_m = tonumber(ARGV[15])
    if rem_m and look_m <= RET_M - WM then
      local lim = lim_m or tonumber(redis.call('HGET', KL, 'm')) or raw_m
      local used = math.min(lim, lim - rem_m)
      local ours = redis.call('ZCOUNT', KM, fmt(now - WM - look_m), '+inf')
      if used - ours > 0 then
        added_m = used - ours
        add_outside(added_m, {KM})
      end
    end
  end
  return {paused, added_m, added_s, fmt(now)}

elseif op == 'snapshot' then
  trim()
  local function count(key, window)
    local members = redis.call('ZRANGEBYSCORE', key, fmt(now - window), '+inf')
    local outside = 0
    for _, m in ipairs(members) do
      if string.sub(m, 1, 1) == 'o' then
        outside = outside + 1
      end
    end
    return #members, outside
  end
  local used_m, out_m = count(KM, WM)
  local used_s, out_s = count(KS, WS)
  local pu = pause_until()
  local reason = ''
  if pu then
    reason = redis.call('HGET', KP, 'reason') or ''
  end
  return {
    fmt(now), used_m, used_s, out_m, out_s,
    pu and fmt(pu) or '', reason,
    redis.call('HGET', KL, 'm') or '', redis.call('HGET', KL, 's') or '',
    effective(cfg_m, 'm'), effective(cfg_s, 's'),
  }
end

return redis.error_reply('ratelimit.lua: unknown op ' .. tostring(op))
