-- Fair share of the fleet's transfer slots across workspaces (see workers/fair_share.py).
-- ARGV[1] mode, ARGV[2] now (unix s), ARGV[3] key prefix, ARGV[4] job key prefix,
-- ARGV[5] lease ttl, ARGV[6] reservation ttl, ARGV[7] demand ttl, ARGV[8..] per mode.
-- Keys are built from the prefix (one Redis, no cluster: like the rest of the project).
local mode = ARGV[1]
local now = tonumber(ARGV[2])
local P = ARGV[3]
local JOB = ARGV[4]
local LEASE_TTL = tonumber(ARGV[5])
local RESERVE_TTL = tonumber(ARGV[6])
local DEMAND_TTL = tonumber(ARGV[7])
local MAX_DISPATCH = 64

local function num(v, default)
  local n = tonumber(v or "")
  if n == nil then return default end
  return n
end

-- Transfer slots of the live workers (each registers its thread count with an expiry).
local function capacity()
  local gone = redis.call("ZRANGEBYSCORE", P .. "workers", "-inf", now)
  for _, h in ipairs(gone) do
    redis.call("ZREM", P .. "workers", h)
    redis.call("HDEL", P .. "slots", h)
  end
  local c = 0
  for _, v in ipairs(redis.call("HVALS", P .. "slots")) do c = c + num(v, 0) end
  if c < 1 then c = 1 end
  return c
end

-- A lease past its expiry lives on while its step's lock does (the lock has the heartbeat);
-- a reservation (dispatched, its step not started) or a dead worker's lease goes.
local function clean(ws)
  local lk = P .. "lease:" .. ws
  for _, job in ipairs(redis.call("ZRANGEBYSCORE", lk, "-inf", now)) do
    if redis.call("EXISTS", JOB .. job .. ":lock:put", JOB .. job .. ":lock:multipart") > 0 then
      redis.call("ZADD", lk, now + LEASE_TTL, job)
    else
      redis.call("ZREM", lk, job)
    end
  end
  redis.call("ZREMRANGEBYSCORE", P .. "demand:" .. ws, "-inf", now)
  return redis.call("ZCARD", lk), redis.call("ZCARD", P .. "wait:" .. ws), redis.call("ZCARD", P .. "demand:" .. ws)
end

-- A workspace that (re)joins starts at the least virtual time of those active: an idle spell
-- earns no credit to crowd the others out later.
local function activate(ws)
  if redis.call("ZSCORE", P .. "active", ws) then return end
  local least = nil
  for _, other in ipairs(redis.call("ZRANGE", P .. "active", 0, -1)) do
    local vt = num(redis.call("HGET", P .. "vtime", other), 0)
    if least == nil or vt < least then least = vt end
  end
  local own = num(redis.call("HGET", P .. "vtime", ws), 0)
  if least ~= nil and least > own then own = least end
  if least == nil then own = 0 end
  redis.call("HSET", P .. "vtime", ws, own)
  redis.call("ZADD", P .. "active", now, ws)
end

local function state()
  local C = capacity()
  local st, W, total = {}, 0, 0
  for _, ws in ipairs(redis.call("ZRANGE", P .. "active", 0, -1)) do
    local inflight, waiting, demand = clean(ws)
    if inflight + waiting + demand == 0 then
      redis.call("ZREM", P .. "active", ws)
    else
      local w = num(redis.call("HGET", P .. "weights", ws), 1)
      if w <= 0 then w = 1 end
      st[#st + 1] = {ws = ws, inflight = inflight, waiting = waiting, demand = demand, w = w,
                     vt = num(redis.call("HGET", P .. "vtime", ws), 0)}
      W = W + w
      total = total + inflight
    end
  end
  for _, s in ipairs(st) do
    s.allowed = math.max(1, math.ceil(C * s.w / W - 1e-9))
  end
  return st, C, total
end

-- Whose waiting job gets the next free slot: the least virtual time among workspaces under
-- their share; if none, and no workspace under its share has work on its way (demand), the
-- least virtual time among all that wait (slots never idle while work waits).
local function pick(st)
  local best = nil
  for _, s in ipairs(st) do
    if s.waiting > 0 and s.inflight < s.allowed and (best == nil or s.vt < best.vt) then best = s end
  end
  if best ~= nil then return best end
  for _, s in ipairs(st) do
    if s.inflight < s.allowed and s.demand > 0 then return nil end
  end
  for _, s in ipairs(st) do
    if s.waiting > 0 and (best == nil or s.vt < best.vt) then best = s end
  end
  return best
end

local function charge(s, cost)
  s.vt = s.vt + cost / s.w
  redis.call("HSET", P .. "vtime", s.ws, s.vt)
end

local function dispatch(st, C, total)
  local out = {}
  while total < C and #out < 2 * MAX_DISPATCH do
    local s = pick(st)
    if s == nil then break end
    local wk = P .. "wait:" .. s.ws
    local job = redis.call("ZRANGE", wk, 0, 0)[1]
    redis.call("ZREM", wk, job)
    charge(s, num(redis.call("HGET", P .. "cost", job), 1))
    redis.call("HDEL", P .. "cost", job)
    redis.call("ZADD", P .. "lease:" .. s.ws, now + RESERVE_TTL, job)
    s.waiting = s.waiting - 1
    s.inflight = s.inflight + 1
    total = total + 1
    out[#out + 1] = s.ws
    out[#out + 1] = job
  end
  return out
end

if mode == "admit" then
  -- ARGV[8] workspace, [9] job, [10] weight, [11] cost, [12] rank while waiting
  local ws, job, cost = ARGV[8], ARGV[9], num(ARGV[11], 1)
  redis.call("HSET", P .. "weights", ws, ARGV[10])
  local lk = P .. "lease:" .. ws
  if redis.call("ZSCORE", lk, job) then -- dispatched to it, or a redelivery of a running lease
    redis.call("ZADD", lk, now + LEASE_TTL, job)
    redis.call("ZREM", P .. "demand:" .. ws, job)
    activate(ws)
    return {1}
  end
  redis.call("ZADD", P .. "demand:" .. ws, now + DEMAND_TTL, job) -- counts while deciding
  activate(ws)
  local st, C, total = state()
  local me = nil
  for _, s in ipairs(st) do if s.ws == ws then me = s end end
  redis.call("ZREM", P .. "demand:" .. ws, job)
  me.demand = me.demand - 1
  local grant = false
  if me.waiting == 0 or redis.call("ZSCORE", P .. "wait:" .. ws, job) and me.waiting == 1 then
    if me.inflight < me.allowed then
      grant = true
    elseif total < C then
      grant = true -- spare slots: only if no other workspace under its share wants one
      for _, s in ipairs(st) do
        if s.ws ~= ws and s.inflight < s.allowed and (s.waiting > 0 or s.demand > 0) then grant = false end
      end
    end
  end
  if grant then
    if redis.call("ZREM", P .. "wait:" .. ws, job) == 1 then
      redis.call("HDEL", P .. "cost", job)
      me.waiting = me.waiting - 1
    end
    redis.call("ZADD", lk, now + LEASE_TTL, job)
    charge(me, cost)
    me.inflight = me.inflight + 1
    -- the transfer a free slot was kept for has come: the others may have their turn now
    return {1, unpack(dispatch(st, C, total + 1))}
  end
  -- wait for a slot in rank order (a job already waiting keeps its place)
  redis.call("ZADD", P .. "wait:" .. ws, "NX", tonumber(ARGV[12]), job)
  redis.call("HSETNX", P .. "cost", job, cost)
  me.waiting = redis.call("ZCARD", P .. "wait:" .. ws)
  local out = dispatch(st, C, total)
  for i = 1, #out, 2 do
    if out[i + 1] == job then -- its own turn came at once: it runs here, no new message
      table.remove(out, i + 1)
      table.remove(out, i)
      redis.call("ZADD", lk, now + LEASE_TTL, job)
      return {1, unpack(out)}
    end
  end
  return {0, unpack(out)}
elseif mode == "release" then
  -- ARGV[8] workspace, [9] job
  redis.call("ZREM", P .. "lease:" .. ARGV[8], ARGV[9])
  local st, C, total = state()
  return dispatch(st, C, total)
elseif mode == "dispatch" then
  local st, C, total = state()
  return dispatch(st, C, total)
elseif mode == "expect" then
  -- ARGV[8] workspace, [9] job, [10] weight: its transfer message is on its way
  redis.call("HSET", P .. "weights", ARGV[8], ARGV[10])
  redis.call("ZADD", P .. "demand:" .. ARGV[8], now + DEMAND_TTL, ARGV[9])
  activate(ARGV[8])
  return {}
elseif mode == "register" then
  -- ARGV[8] worker host, [9] its slots, [10] ttl; slots 0 unregisters
  if tonumber(ARGV[9]) > 0 then
    redis.call("ZADD", P .. "workers", now + tonumber(ARGV[10]), ARGV[8])
    redis.call("HSET", P .. "slots", ARGV[8], ARGV[9])
  else
    redis.call("ZREM", P .. "workers", ARGV[8])
    redis.call("HDEL", P .. "slots", ARGV[8])
  end
  return {}
elseif mode == "snapshot" then
  local st, C, total = state()
  local out = {tostring(C), tostring(total)}
  for _, s in ipairs(st) do
    out[#out + 1] = s.ws
    out[#out + 1] = tostring(s.inflight)
    out[#out + 1] = tostring(s.waiting)
    out[#out + 1] = tostring(s.demand)
    out[#out + 1] = tostring(s.w)
    out[#out + 1] = tostring(s.allowed)
  end
  return out
end
return redis.error_reply("fair_share: unknown mode " .. tostring(mode))
