-- Fair share of the fleet's transfer slots across workspaces (see workers/fair_share.py).
-- ARGV[1] mode, ARGV[2] now (unix s), ARGV[3] key prefix, ARGV[4] job key prefix,
-- ARGV[5] lease ttl, ARGV[6] reservation ttl, ARGV[7] demand ttl, ARGV[8..] per mode.
-- Keys are built from the prefix (one Redis, no cluster: like the rest of the project).
--
-- The jobs are in sorted sets per workspace (lease:, wait:, demand:) and stay the truth. The
-- book (one JSON string) holds the rest, so that a call on the hot path reads it once
-- instead of asking every set: the fleet's capacity until its earliest worker expires, and the
-- active workspaces in joining order with their weight, virtual time, lease count, waiting
-- count and `due`, a time at or before the earliest expiry in their lease and demand sets.
-- Until `due` nothing of theirs can expire, so the expiry scans are skipped. Only this script
-- writes leases, so the lease count is exact; a waiting list may shrink behind its back (drain),
-- so a waiting count above 0 is read again. `dispatch` and `snapshot` (the sweeper, metrics)
-- count everything afresh. A workspace's virtual time is kept in `vtime` while it is inactive.
local mode = ARGV[1]
local now = tonumber(ARGV[2])
local P = ARGV[3]
local JOB = ARGV[4]
local LEASE_TTL = tonumber(ARGV[5])
local RESERVE_TTL = tonumber(ARGV[6])
local DEMAND_TTL = tonumber(ARGV[7])
local MAX_DISPATCH = 64
local BOOK = P .. "book"

local function num(v, default)
  local n = tonumber(v or "")
  if n == nil then return default end
  return n
end

local function weight(v)
  local w = num(v, 1)
  if w <= 0 then w = 1 end
  return w
end

local book, dirty

-- Numbers as text with 17 digits: a double comes back as it went (cjson's own keeps 14).
local function text(x)
  if x == nil then return nil end
  return string.format("%.17g", x)
end

local function save()
  if not dirty then return end
  local ws = {}
  for i, s in ipairs(book.ws) do -- what a call works out (allowed, demand) is not kept
    ws[i] = {name = s.name, t = text(s.t), w = text(s.w), vt = text(s.vt), n = text(s.n),
             q = text(s.q), due = text(s.due)}
  end
  redis.call("SET", BOOK, cjson.encode({cap = text(book.cap), cap_due = text(book.cap_due), ws = ws}))
end

local function lower_due(s, t)
  if s.due == nil or t < s.due then
    s.due = t
    dirty = true
  end
end

-- Counts and due of one workspace from its sets (no expiry scan).
local function recount(s)
  local lk, dk = P .. "lease:" .. s.name, P .. "demand:" .. s.name
  s.n = redis.call("ZCARD", lk)
  s.q = redis.call("ZCARD", P .. "wait:" .. s.name)
  s.demand = redis.call("ZCARD", dk)
  s.due = nil
  local first = redis.call("ZRANGE", lk, 0, 0, "WITHSCORES")
  if first[2] then s.due = tonumber(first[2]) end
  first = redis.call("ZRANGE", dk, 0, 0, "WITHSCORES")
  if first[2] and (s.due == nil or tonumber(first[2]) < s.due) then s.due = tonumber(first[2]) end
  dirty = true
end

-- A lease past its expiry lives on while its step's lock does (the lock has the heartbeat);
-- a reservation (dispatched, its step not started) or a dead worker's lease goes.
local function clean(s)
  local lk = P .. "lease:" .. s.name
  for _, job in ipairs(redis.call("ZRANGEBYSCORE", lk, "-inf", now)) do
    if redis.call("EXISTS", JOB .. job .. ":lock:put", JOB .. job .. ":lock:multipart") > 0 then
      redis.call("ZADD", lk, now + LEASE_TTL, job)
    else
      redis.call("ZREM", lk, job)
    end
  end
  redis.call("ZREMRANGEBYSCORE", P .. "demand:" .. s.name, "-inf", now)
  recount(s)
end

-- Bring a workspace's counts up to now: all afresh if asked or if something of it may have expired.
local function refresh(s, full)
  s.demand = nil
  if full or s.n == nil or s.q == nil or (s.due ~= nil and s.due <= now) then
    clean(s)
  elseif s.q > 0 then
    local q = redis.call("ZCARD", P .. "wait:" .. s.name)
    if q ~= s.q then s.q, dirty = q, true end
  end
end

-- Transfers on their way, read when a decision needs them (nothing of it expired before `due`).
local function demand(s)
  if s.demand == nil then s.demand = redis.call("ZCARD", P .. "demand:" .. s.name) end
  return s.demand
end

local function load()
  dirty = false
  local raw = redis.call("GET", BOOK)
  if raw then
    local kept = cjson.decode(raw)
    book = {cap = num(kept.cap, nil), cap_due = num(kept.cap_due, nil), ws = {}}
    for i, s in ipairs(kept.ws or {}) do
      book.ws[i] = {name = s.name, t = num(s.t, now), w = num(s.w, 1), vt = num(s.vt, 0),
                    n = num(s.n, nil), q = num(s.q, nil), due = num(s.due, nil)}
    end
    return
  end
  -- none yet (or the layout before it): take the active workspaces from the sets it replaces
  book = {ws = {}}
  local active = redis.call("ZRANGE", P .. "active", 0, -1, "WITHSCORES")
  for i = 1, #active, 2 do
    local s = {name = active[i], t = tonumber(active[i + 1]),
               w = weight(redis.call("HGET", P .. "weights", active[i])),
               vt = num(redis.call("HGET", P .. "vtime", active[i]), 0)}
    recount(s)
    book.ws[#book.ws + 1] = s
  end
  redis.call("DEL", P .. "active", P .. "weights")
  dirty = true
end

-- Transfer slots of the live workers (each registers its thread count with an expiry); kept
-- in the book until the earliest registration expires or a worker registers.
local function capacity(force)
  if not force and book.cap ~= nil and (book.cap_due == nil or book.cap_due > now) then
    return book.cap
  end
  local gone = redis.call("ZRANGEBYSCORE", P .. "workers", "-inf", now)
  for _, h in ipairs(gone) do
    redis.call("ZREM", P .. "workers", h)
    redis.call("HDEL", P .. "slots", h)
  end
  local c = 0
  for _, v in ipairs(redis.call("HVALS", P .. "slots")) do c = c + num(v, 0) end
  if c < 1 then c = 1 end
  local first = redis.call("ZRANGE", P .. "workers", 0, 0, "WITHSCORES")
  book.cap, book.cap_due, dirty = c, tonumber(first[2] or ""), true
  return c
end

-- A workspace that (re)joins starts at the least virtual time of those active: an idle spell
-- earns no credit to crowd the others out later.
local function activate(ws, w)
  for _, s in ipairs(book.ws) do
    if s.name == ws then
      if s.w ~= w then s.w, dirty = w, true end
      return s
    end
  end
  local least = nil
  for _, other in ipairs(book.ws) do
    if least == nil or other.vt < least then least = other.vt end
  end
  local own = num(redis.call("HGET", P .. "vtime", ws), 0)
  if least ~= nil and least > own then own = least end
  if least == nil then own = 0 end
  local s = {name = ws, t = now, w = w, vt = own}
  recount(s)
  local at = #book.ws + 1 -- in joining order, as a sorted set by time then name would be
  for i, other in ipairs(book.ws) do
    if other.t > now or (other.t == now and other.name > ws) then
      at = i
      break
    end
  end
  table.insert(book.ws, at, s)
  return s
end

-- Every active workspace's counts and share; those with nothing in flight, waiting or on its
-- way leave (but `keep`, whose transfer is being decided).
local function state(full, keep)
  local C = capacity(full)
  local st, W, total = {}, 0, 0
  for _, s in ipairs(book.ws) do
    refresh(s, full)
    if s.name ~= keep and s.n + s.q == 0 and demand(s) == 0 then
      redis.call("HSET", P .. "vtime", s.name, s.vt)
      dirty = true
    else
      st[#st + 1] = s
      W = W + s.w
      total = total + s.n
    end
  end
  book.ws = st
  for _, s in ipairs(st) do
    s.allowed = math.max(1, math.ceil(C * s.w / W - 1e-9))
  end
  return st, C, total
end

-- Whose waiting job gets the next free slot: the least virtual time among workspaces under
-- their share; if none, and no workspace under its share has work on its way (demand), the
-- least virtual time among all that wait (slots never idle while work waits).
local function pick(st)
  local best, any = nil, false
  for _, s in ipairs(st) do
    if s.q > 0 then
      any = true
      if s.n < s.allowed and (best == nil or s.vt < best.vt) then best = s end
    end
  end
  if best ~= nil or not any then return best end
  for _, s in ipairs(st) do
    if s.n < s.allowed and demand(s) > 0 then return nil end
  end
  for _, s in ipairs(st) do
    if s.q > 0 and (best == nil or s.vt < best.vt) then best = s end
  end
  return best
end

local function charge(s, cost)
  s.vt = s.vt + cost / s.w
  dirty = true
end

local function dispatch(st, C, total)
  local out = {}
  while total < C and #out < 2 * MAX_DISPATCH do
    local s = pick(st)
    if s == nil then break end
    local job = redis.call("ZPOPMIN", P .. "wait:" .. s.name)[1]
    charge(s, num(redis.call("HGET", P .. "cost", job), 1))
    redis.call("HDEL", P .. "cost", job)
    s.n = s.n + redis.call("ZADD", P .. "lease:" .. s.name, now + RESERVE_TTL, job)
    lower_due(s, now + RESERVE_TTL)
    s.q = s.q - 1
    total = total + 1
    out[#out + 1] = s.name
    out[#out + 1] = job
  end
  return out
end

local function admit()
  -- ARGV[8] workspace, [9] job, [10] weight, [11] cost, [12] rank while waiting
  local ws, job, cost = ARGV[8], ARGV[9], num(ARGV[11], 1)
  local lk = P .. "lease:" .. ws
  if redis.call("ZSCORE", lk, job) then -- dispatched to it, or a redelivery of a running lease
    redis.call("ZADD", lk, now + LEASE_TTL, job)
    redis.call("ZREM", P .. "demand:" .. ws, job)
    lower_due(activate(ws, weight(ARGV[10])), now + LEASE_TTL) -- may be sooner than its reservation
    return {1}
  end
  -- its announcement (if any) goes now; the workspace counts while this is decided all the same
  redis.call("ZREM", P .. "demand:" .. ws, job)
  local me = activate(ws, weight(ARGV[10]))
  local st, C, total = state(false, ws)
  local grant = false
  if me.q == 0 or redis.call("ZSCORE", P .. "wait:" .. ws, job) and me.q == 1 then
    if me.n < me.allowed then
      grant = true
    elseif total < C then
      grant = true -- spare slots: only if no other workspace under its share wants one
      for _, s in ipairs(st) do
        if s.name ~= ws and s.n < s.allowed and (s.q > 0 or demand(s) > 0) then grant = false end
      end
    end
  end
  if grant then
    if me.q > 0 and redis.call("ZREM", P .. "wait:" .. ws, job) == 1 then
      redis.call("HDEL", P .. "cost", job)
      me.q = me.q - 1
    end
    me.n = me.n + redis.call("ZADD", lk, now + LEASE_TTL, job)
    lower_due(me, now + LEASE_TTL)
    charge(me, cost)
    -- the transfer a free slot was kept for has come: the others may have their turn now
    return {1, unpack(dispatch(st, C, total + 1))}
  end
  -- wait for a slot in rank order (a job already waiting keeps its place)
  redis.call("ZADD", P .. "wait:" .. ws, "NX", tonumber(ARGV[12]), job)
  redis.call("HSETNX", P .. "cost", job, cost)
  me.q = redis.call("ZCARD", P .. "wait:" .. ws)
  dirty = true
  local out = dispatch(st, C, total)
  for i = 1, #out, 2 do
    if out[i + 1] == job then -- its own turn came at once: it runs here, no new message
      table.remove(out, i + 1)
      table.remove(out, i)
      redis.call("ZADD", lk, now + LEASE_TTL, job)
      lower_due(me, now + LEASE_TTL)
      return {1, unpack(out)}
    end
  end
  return {0, unpack(out)}
end

local reply
if mode == "admit" then
  load()
  reply = admit()
elseif mode == "release" then
  -- ARGV[8] workspace, [9] job
  load() -- first: a book made now counts from the sets as they are before the ZREM
  local gone = redis.call("ZREM", P .. "lease:" .. ARGV[8], ARGV[9])
  if gone > 0 then
    for _, s in ipairs(book.ws) do
      if s.name == ARGV[8] and s.n ~= nil then
        s.n, dirty = s.n - 1, true
        if s.n < 0 then s.n = nil end -- not what the set says: count it afresh
      end
    end
  end
  reply = dispatch(state(false))
elseif mode == "dispatch" then
  load()
  reply = dispatch(state(true))
elseif mode == "expect" then
  -- ARGV[8] workspace, [9] job, [10] weight: its transfer message is on its way
  redis.call("ZADD", P .. "demand:" .. ARGV[8], now + DEMAND_TTL, ARGV[9])
  load()
  lower_due(activate(ARGV[8], weight(ARGV[10])), now + DEMAND_TTL)
  reply = {}
elseif mode == "register" then
  -- ARGV[8] worker host, [9] its slots, [10] ttl; slots 0 unregisters
  if tonumber(ARGV[9]) > 0 then
    redis.call("ZADD", P .. "workers", now + tonumber(ARGV[10]), ARGV[8])
    redis.call("HSET", P .. "slots", ARGV[8], ARGV[9])
  else
    redis.call("ZREM", P .. "workers", ARGV[8])
    redis.call("HDEL", P .. "slots", ARGV[8])
  end
  load()
  capacity(true)
  reply = {}
elseif mode == "snapshot" then
  load()
  local st, C, total = state(true)
  reply = {tostring(C), tostring(total)}
  for _, s in ipairs(st) do
    reply[#reply + 1] = s.name
    reply[#reply + 1] = tostring(s.n)
    reply[#reply + 1] = tostring(s.q)
    reply[#reply + 1] = tostring(demand(s))
    reply[#reply + 1] = tostring(s.w)
    reply[#reply + 1] = tostring(s.allowed)
  end
else
  return redis.error_reply("fair_share: unknown mode " .. tostring(mode))
end
save()
return reply
