-- Fleet-wide rate limiter for one awork workspace. Loaded by workers/ratelimit.py (EVALSHA).
--
-- Every decision runs atomically on the Redis server with the server's clock (TIME), so the
-- fleet agrees on one time and one count whatever the workers' clocks say.
--
-- KEYS (all in one hash slot: awork:rl:{workspace}:..., named by producers/keys.py)
--   1 minute log  (zset: member -> grant time in microseconds; "g<n>" ours, "o<n>" outside usage)
--   2 second log  (zset, same members/scores, kept for a shorter time)
--   3 state       (hash, read with ONE HMGET per call; all times in microseconds of Redis TIME)
--       until, reason, since  the pause
--       m, s, learned_until   awork's own x-ratelimit-limit-minute / -second, and until when
--                             they count ("" = not learned)
--       seq                   the last log member number; a new state starts it at the Redis
--                             time, so it never reuses a member still in a log
--       tat                   pacing: theoretical arrival time of the next evenly spaced request
--       trimmed               when entries older than the retention were last removed
--       hi                    the latest score written to a log (hi > now + FUTURE: the clock
--                             stepped back and the logs hold entries from the "future")
--       exp, exp_m, exp_s     the expiry last set on the state, the minute log, the second log
--
-- Layout history: up to 2026-11 the pause, learned limits, seq and pace were four keys of their
-- own (`pause`, `learned`, `seq`, `pace`). During a rolling upgrade from that layout both
-- versions count the same two logs (so both windows hold for the whole fleet), but neither sees
-- the other's pauses, learned limits or pacing, and an old worker's PEXPIRE can cut short an
-- expiry recorded here (exp_m, exp_s). The old keys expire by themselves.
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
-- Rules enforced by acquire (a token is granted only if all hold, otherwise no token is taken
-- and the reply says how long until they would):
--   * no pause in force;
--   * fewer than Lm entries with a score in [now - 60 s, now + FUTURE]   (closed interval)
--   * fewer than Ls entries with a score in [now - 1 s, now + FUTURE]
--   * pacing: grants spaced 1/Ls apart on average, at most PACE_TOLERANCE ahead of schedule.
-- The closed intervals make "at most L in ANY interval of 60 s (resp. 1 s)" hold for every
-- placement of the interval, hence for awork's fixed windows whatever their alignment. (Entries
-- after `now` exist only after the clock stepped back by up to FUTURE; they count.)
--
-- Few commands per call (INFO commandstats counts those a script runs): one HMGET reads the
-- whole state, one HSET writes what changed (nothing when nothing did). Every count has
-- explicit bounds, so no count depends on when old entries were removed: they are trimmed at
-- most once per TRIM_EVERY, entries beyond now + FUTURE as soon as a call sees them (hi), and
-- expiries are pushed out only when the recorded one no longer covers what was just written,
-- REFRESH beyond that need, i.e. about once per REFRESH while a workspace is busy.
-- A granted acquire runs 7 commands (TIME, HMGET, ZCOUNT x2, ZADD x2, HSET), a refused one 2-6,
-- an observe of a 2xx with rate-limit headers 4 (TIME, HMGET, ZCOUNT x2) plus a ZADD and the
-- HSET when it learns outside usage; add 2 for a due trim and 1 per expiry pushed out.

if redis.replicate_commands then
  -- Redis < 5 replicates scripts verbatim and refuses writes after TIME without this; from
  -- Redis 5 on effects replication is the default, and from 7 on this is a no-op.
  redis.replicate_commands()
end

local KM, KS, KH = KEYS[1], KEYS[2], KEYS[3]
local unpack = unpack or table.unpack

local WM = 60000000          -- minute window, microseconds
local WS = 1000000           -- second window
local RET_M = WM + 10000000  -- how long minute-log entries are kept (window + observe look-back)
local RET_S = WS + 3000000
local FUTURE = WS            -- entries further in the future than this come from a clock step back
local TRIM_EVERY = 1000000   -- entries older than the retention are removed at most this often
local REFRESH = 5000000      -- an expiry is set this far beyond its need, so pushed out this often
local MARGIN_EXP = 1000000   -- keys last at least this long beyond the last entry's retention
local LEARN_SLACK = 5000000  -- learned limits are kept for learned_ttl + up to this (see observe)

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
local NOW = fmt(now)            -- as strings, formatted once (string.format is not free)
local UPTO = fmt(now + FUTURE)  -- the upper bound of every count
local cfg_m = tonumber(ARGV[3])
local cfg_s = tonumber(ARGV[4])
local margin = tonumber(ARGV[5])
local raw_m = tonumber(ARGV[6])
local raw_s = tonumber(ARGV[7])

-- The state, in one read.
local FIELDS = {'until', 'reason', 'since', 'm', 's', 'learned_until', 'seq', 'tat', 'trimmed',
  'hi', 'exp', 'exp_m', 'exp_s'}
local raw = redis.call('HMGET', KH, unpack(FIELDS))
local reason_raw = raw[2]
local pu = tonumber(raw[1])          -- pause until (may be over)
local learned_until = tonumber(raw[6])
local learned_m, learned_s
if learned_until and learned_until > now then
  learned_m, learned_s = tonumber(raw[4]), tonumber(raw[5])
else
  learned_until = nil
end
local seq = tonumber(raw[7])
local tat = tonumber(raw[8])
local trimmed = tonumber(raw[9])
local hi = tonumber(raw[10])
local exp_h, exp_m, exp_s = tonumber(raw[11]), tonumber(raw[12]), tonumber(raw[13])

-- Fields to write, flushed by commit() in one HSET.
local upd = {}
local function put(field, value)
  upd[#upd + 1] = field
  upd[#upd + 1] = value
end

-- Write the changed fields, and push the state's expiry out if it no longer covers what the
-- state must outlive: the logs once it counts their members (see keep), a pause in force,
-- learned limits.
local function commit()
  if #upd == 0 then
    return
  end
  local need = now
  if seq then
    need = now + RET_M + MARGIN_EXP + REFRESH
  end
  if pu and pu + MARGIN_EXP > need then
    need = pu + MARGIN_EXP
  end
  if learned_until and learned_until + MARGIN_EXP > need then
    need = learned_until + MARGIN_EXP
  end
  local refresh = not exp_h or exp_h < need
  if refresh then
    put('exp', fmt(need + REFRESH))
  end
  redis.call('HSET', KH, unpack(upd))
  if refresh then
    redis.call('PEXPIRE', KH, math.ceil(REFRESH / 1000) + math.ceil((need - now) / 1000))
  end
end

-- After writing to a log: make sure it lasts until `need` (push its expiry REFRESH further when
-- the recorded one falls short; the log must exist, so call this after the ZADD).
local function keep(key, field, known, need)
  if not known or known < need then
    redis.call('PEXPIRE', key, math.ceil(REFRESH / 1000) + math.ceil((need - now) / 1000))
    put(field, fmt(need + REFRESH))
  end
end

-- Entries written before the clock stepped back by more than FUTURE: never counted (every
-- count stops at now + FUTURE) and removed at the first call that sees them, as if trimmed on
-- every call.
local function trim_future()
  if hi and hi > now + FUTURE then
    redis.call('ZREMRANGEBYSCORE', KM, '(' .. UPTO, '+inf')
    redis.call('ZREMRANGEBYSCORE', KS, '(' .. UPTO, '+inf')
    hi = now + FUTURE
    put('hi', fmt(hi))
  end
end

-- Entries older than the retention: no count reaches them; removed at most once per TRIM_EVERY
-- (by a call that writes to the logs).
local function trim_old()
  if not trimmed or now - trimmed >= TRIM_EVERY or trimmed > now then
    redis.call('ZREMRANGEBYSCORE', KM, '-inf', '(' .. fmt(now - RET_M))
    redis.call('ZREMRANGEBYSCORE', KS, '-inf', '(' .. fmt(now - RET_S))
    trimmed = now
    put('trimmed', NOW)
  end
end

local function wrote_logs()
  trim_old()
  put('seq', fmt(seq))
  if not hi or now > hi then
    hi = now
    put('hi', NOW)
  end
end

-- The lower of the configured effective limit and awork's advertised limit with the margin.
local function effective(cfg, learned)
  if learned and learned > 0 then
    local l = math.max(1, math.floor(learned * margin + 1e-9))
    if l < cfg then
      return l
    end
  end
  return cfg
end

-- Set a pause of `dur` microseconds from now; an existing longer pause wins.
local function set_pause(dur, reason)
  local new_until = now + dur
  if pu and pu > now and pu >= new_until then
    return pu
  end
  pu = new_until
  put('until', fmt(new_until))
  put('reason', reason)
  put('since', NOW)
  return new_until
end

-- Add n entries at `now` to a log (outside usage).
local function add_outside(n, key)
  local first = (seq or now) + 1
  local last = first + n - 1
  seq = last
  local score = NOW
  local i = first
  while i <= last do
    local args = {}
    local j = i
    while j <= last and j < i + 1000 do
      args[#args + 1] = score
      args[#args + 1] = 'o' .. fmt(j)
      j = j + 1
    end
    redis.call('ZADD', key, unpack(args))
    i = j
  end
end

-- How long until fewer than `limit` entries lie in [t - window, t + FUTURE]; 0 if that holds now.
local function window_wait(key, window, limit)
  local lo = fmt(now - window)
  local count = redis.call('ZCOUNT', key, lo, UPTO)
  if count < limit then
    return 0
  end
  -- The (count - limit)-th entry (0-based, oldest first) is the last that must age out.
  local e = redis.call('ZRANGEBYSCORE', key, lo, UPTO, 'WITHSCORES', 'LIMIT', count - limit, 1)
  if #e < 2 then
    return 1
  end
  return math.max(1, tonumber(e[2]) + window - now + 1)
end
-- The longest wait window_wait can return: an entry at now + FUTURE.
local MAX_WAIT_M = WM + FUTURE + 1
local MAX_WAIT_S = WS + FUTURE + 1

if op == 'acquire' then
  -- ARGV 8: pace tolerance in microseconds (0 = no pacing beyond the windows)
  local tol = tonumber(ARGV[8])
  trim_future()
  local lm = effective(cfg_m, learned_m)
  local ls = effective(cfg_s, learned_s)

  -- The longest wait wins; on a tie the first of pause, minute, second, pace names it. A window
  -- whose longest possible wait cannot beat a known one is not read.
  local pause_w = 0
  if pu and pu > now then
    pause_w = pu - now
  end
  local pace_w = 0
  if tol > 0 and tat then
    pace_w = tat - tol - now
  end
  local wait, why = pause_w, 'pause'
  if pause_w <= 0 then
    wait, why = 0, 'ok'
  end
  if wait < MAX_WAIT_M and pace_w <= MAX_WAIT_M then
    local w = window_wait(KM, WM, lm)
    if w > wait then
      wait, why = w, 'minute'
    end
  end
  if wait < MAX_WAIT_S and pace_w <= MAX_WAIT_S then
    local w = window_wait(KS, WS, ls)
    if w > wait then
      wait, why = w, 'second'
    end
  end
  if pace_w > wait then
    wait, why = pace_w, 'pace'
  end
  if wait > 0 then
    commit()  -- only after a clock step back: trim_future's mark
    return {fmt(wait), why, NOW}
  end

  seq = (seq or now) + 1
  local member = 'g' .. fmt(seq)
  local score = NOW
  redis.call('ZADD', KM, score, member)
  redis.call('ZADD', KS, score, member)
  keep(KM, 'exp_m', exp_m, now + RET_M + MARGIN_EXP)
  keep(KS, 'exp_s', exp_s, now + RET_S + MARGIN_EXP)
  wrote_logs()
  if tol > 0 then
    local base = now
    if tat and tat > now then
      base = tat
    end
    put('tat', fmt(base + math.ceil(WS / ls)))
  end
  commit()
  return {'0', 'ok', NOW}

elseif op == 'pause' then
  -- ARGV 8: duration in microseconds, 9: reason
  local u = set_pause(tonumber(ARGV[8]), ARGV[9])
  commit()
  return {fmt(u), NOW}

elseif op == 'observe' then
  -- ARGV 8: pause duration in microseconds ("" = no pause; "-1" = until the next minute
  --         boundary of the server clock, plus 1 s), 9: pause reason,
  --         10/11: x-ratelimit-limit-minute / -remaining-minute ("" = absent),
  --         12/13: x-ratelimit-limit-second / -remaining-second,
  --         14: "1" = learn outside usage from the remaining-* figures,
  --         15/16: look-back beyond the window for our own entries (minute / second), us,
  --         17: how long learned limits are kept, ms
  trim_future()
  local paused = ''
  if ARGV[8] ~= '' then
    local dur = tonumber(ARGV[8])
    if dur < 0 then
      dur = WM - (now % WM) + 1000000
    end
    paused = fmt(set_pause(dur, ARGV[9]))
  end

  -- Learned limits count until learned_ttl after the last response that carried them, or up to
  -- LEARN_SLACK longer: an unchanged figure is written again only when its end came nearer than
  -- learned_ttl, and then LEARN_SLACK beyond it.
  local lim_m = tonumber(ARGV[10])
  local lim_s = tonumber(ARGV[12])
  local has_m = lim_m and lim_m > 0
  local has_s = lim_s and lim_s > 0
  if has_m or has_s then
    local ttl = tonumber(ARGV[17]) * 1000
    local new_m = learned_m
    local new_s = learned_s
    if has_m then new_m = lim_m end
    if has_s then new_s = lim_s end
    if new_m ~= learned_m or new_s ~= learned_s or not learned_until
        or learned_until < now + ttl then
      learned_m, learned_s = new_m, new_s
      learned_until = now + ttl + math.min(LEARN_SLACK, ttl)
      put('m', learned_m and fmt(learned_m) or '')
      put('s', learned_s and fmt(learned_s) or '')
      put('learned_until', fmt(learned_until))
      if learned_until <= now then
        learned_m, learned_s, learned_until = nil, nil, nil
      end
    end
  end

  local added_s, added_m = 0, 0
  if ARGV[14] == '1' then
    -- Second window first: its outside entries go to the second log only. The minute log
    -- learns from the minute figures, which already include those requests.
    -- How many requests awork counted in one window beyond those our log holds (added to it).
    local function learn(key, window, retain, remaining, look, lim, exp_field, exp_at)
      if not (remaining and look <= retain - window) then
        return 0
      end
      local used = math.min(lim, lim - remaining)
      if used <= 0 then
        return 0
      end
      local ours = redis.call('ZCOUNT', key, fmt(now - window - look), UPTO)
      if used - ours <= 0 then
        return 0
      end
      add_outside(used - ours, key)
      keep(key, exp_field, exp_at, now + retain + MARGIN_EXP)
      return used - ours
    end
    added_s = learn(KS, WS, RET_S, tonumber(ARGV[13]), tonumber(ARGV[16]),
      lim_s or learned_s or raw_s, 'exp_s', exp_s)
    added_m = learn(KM, WM, RET_M, tonumber(ARGV[11]), tonumber(ARGV[15]),
      lim_m or learned_m or raw_m, 'exp_m', exp_m)
    if added_s > 0 or added_m > 0 then
      wrote_logs()
    end
  end
  commit()
  return {paused, added_m, added_s, NOW}

elseif op == 'snapshot' then
  trim_future()
  commit()
  local function count(key, window)
    local members = redis.call('ZRANGEBYSCORE', key, fmt(now - window), UPTO)
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
  local paused, reason = '', ''
  if pu and pu > now then
    paused, reason = fmt(pu), reason_raw or ''
  end
  return {
    NOW, used_m, used_s, out_m, out_s, paused, reason,
    learned_m and fmt(learned_m) or '', learned_s and fmt(learned_s) or '',
    effective(cfg_m, learned_m), effective(cfg_s, learned_s),
  }
end

return redis.error_reply('ratelimit.lua: unknown op ' .. tostring(op))
