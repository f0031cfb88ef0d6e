--- The batch's gate to the gateway: every request a batch sends (token, search, get, replace, topology) goes
-- through one transport that caps the rate (`qps`, a token bucket), retries what the gateway refused for load
-- (429 always, 503 for anything but a replace) after its Retry-After (capped by `max_retry_after`) or a
-- full-jitter exponential backoff, and pauses every task meanwhile (backpressure for all, not one).
--
-- `before_send(req)` is called before each attempt leaves, after the rate limit let it go: the batch writes
-- its durable "sending" record there for a replace (`req.call == "replace_device"`, named by the client).
-- @module enos.batch.gate
local M = {}

local Gate = {}
Gate.__index = Gate

--- A gate over `base` (a transport: send, and optionally decrypt) driven by `sched` (enos.scheduler).
-- opts: qps (nil: no cap), retry_attempts, backoff_ms, backoff_max_ms, max_retry_after (seconds),
-- before_send(req), random (for tests: a function returning [0, 1)).
-- @treturn table the gate; `gate.transport` is what a client sends through (client:use_transport)
function M.new(sched, base, opts)
  local self = setmetatable({
    sched = sched, base = base, o = opts, pause_until = 0, random = opts.random or math.random,
    requests = 0,              -- requests sent (every attempt)
    retries = 0,               -- attempts refused for load and sent again
    retry_after_cut = nil,     -- the longest Retry-After cut to max_retry_after (seconds)
    bucket = { tokens = opts.qps and math.max(1, opts.qps) or 0, at = sched.now() },
  }, Gate)
  self.transport = {
    wait_for = function(_, pred) return sched:wait_for(pred) end,
    decrypt = base.decrypt and function(_, ...) return base:decrypt(...) end,
    send = function(_, req) return self:send(req) end,
  }
  return self
end

--- Waits until a request may leave: after a 429/503 pause, and within the rate.
function Gate:acquire()
  local sched, qps = self.sched, self.o.qps
  if self.pause_until > 0 then                -- (set by a 429/503; no clock read otherwise)
    local now = sched.now()
    if now < self.pause_until then sched:sleep((self.pause_until - now) / 1000) else self.pause_until = 0 end
  end
  if qps then
    local b = self.bucket
    while true do
      local now = sched.now()
      b.tokens = math.min(math.max(1, qps), b.tokens + (now - b.at) / 1000 * qps)
      b.at = now
      if b.tokens >= 1 then b.tokens = b.tokens - 1 break end
      sched:sleep((1 - b.tokens) / qps)
    end
  end
end

--- The ceiling of the exponential backoff after `attempt` tries (ms).
function Gate:backoff_cap(attempt)
  return math.min(self.o.backoff_max_ms, self.o.backoff_ms * 2 ^ attempt)
end

--- Seconds left of a 429/503 pause, or nil.
function Gate:paused()
  local now = self.sched.now()
  return self.pause_until > now and (self.pause_until - now) / 1000 or nil
end

--- Sends `req` through the base transport after `acquire`, calling `before_send(req)` before each attempt; a
-- 429 (or a 503 on anything but a replace) pauses every task and is sent again, up to `retry_attempts` sends.
-- @treturn table|nil the last reply (a 429/503 one when the attempts ran out)
-- @return the transport's error when no reply came
function Gate:send(req)
  local o = self.o
  local is_replace = req.call == "replace_device"       -- (named by the client: never guessed from a URL)
  local attempt = 0
  while true do
    attempt = attempt + 1
    self:acquire()
    if o.before_send then o.before_send(req) end        -- (each attempt: a retry may leave much later)
    self.requests = self.requests + 1
    local res, err = self.base:send(req)
    local st = res and res.status
    -- a 503 on a replace may have been applied: never sent again blindly (the workflow reads back)
    local safe_retry = st == 429 or (st == 503 and not is_replace)
    if not safe_retry or attempt >= o.retry_attempts then return res, err end
    local ra = tonumber(res.headers and res.headers["retry-after"])
    if ra and ra > o.max_retry_after then
      self.retry_after_cut = math.max(self.retry_after_cut or 0, ra)
      ra = o.max_retry_after
    end
    local delay = ra and math.max(ra, 0) * 1000 or self.random() * self:backoff_cap(attempt)
    self.pause_until = math.max(self.pause_until, self.sched.now() + delay)
    self.retries = self.retries + 1
  end
end

return M
