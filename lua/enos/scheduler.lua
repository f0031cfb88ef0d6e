--- A coroutine scheduler over the libcurl multi transport (docs/design.md).
-- Tasks are coroutines; `sched.transport:send(req)` inside a task yields until
-- its transfer finishes, so many client calls run concurrently on one thread.
-- @module enos.scheduler
local core = require "enos.core"

local M = {}

local Sched = {}
Sched.__index = Sched

local SEND, SLEEP, WAIT, SIGNAL, JOB = {}, {}, {}, {}, {}      -- yield markers

--- Creates a scheduler. opts: the transport options of enos.client
-- (timeout, connect_timeout, cafile, capath, verify_tls, user_agent, max_body)
-- plus max_connections; or `multi` = an existing core.multi object.
function M.new(opts)
  opts = opts or {}
  local self = setmetatable({
    multi = opts.multi or core.multi {
      timeout = opts.timeout, connect_timeout = opts.connect_timeout, cafile = opts.cafile,
      capath = opts.capath, verify_tls = opts.verify_tls, user_agent = opts.user_agent,
      max_body = opts.max_body, max_connections = opts.max_connections,
    },
    ready = {},        -- {co, args…}
    by_id = {},        -- transfer id → co
    sleeping = {},     -- {at = ms, co}
    waiting = {},      -- {pred, co}
    signals = {},      -- name → {co, …} (woken together by signal(name))
    tasks = {},        -- co → task record
    callbacks = {},    -- worker job id → function(res, err) (jobs submitted outside tasks)
    ntasks = 0,
    errors = {},
  }, Sched)
  local sched = self
  -- The transport a client uses: blocks in place when called outside a task.
  self.transport = {
    send = function(_, req) return sched:send(req) end,
    wait_for = function(_, pred) return sched:wait_for(pred) end,
    decrypt = function(_, ...) return sched:decrypt(...) end,
    close = function() end,
  }
  return self
end

--- The monotonic clock in milliseconds (`sched.now()`, no self).
function Sched.now() return core.monotonic_ms() end

local function in_task(self)
  local co = coroutine.running()
  return co and self.tasks[co] ~= nil
end

--- Sends a request; inside a task it yields until the reply.
function Sched:send(req)
  if in_task(self) then
    return coroutine.yield(SEND, req)
  end
  -- Outside any task: drive the multi handle until this transfer is done.
  local id = self.multi:add(req)
  while true do
    local mine = self:_collect(1, id)
    if mine then
      if mine.res then return mine.res end
      return nil, mine.err
    end
  end
end

--- core.decrypt_secret(key, sessionKey, deviceSecret, pad, mode, kf, enc) off the event loop:
-- inside a task it runs in the transport's worker thread while other tasks go on.
-- @return plaintext | nil, message
function Sched:decrypt(...)
  if not in_task(self) or not self.multi.decrypt then return core.decrypt_secret(...) end
  local res, err = coroutine.yield(JOB, { n = select("#", ...), ... })
  if res then return res end
  return nil, err and err.message or "decryption failed"
end

--- fsync of an enos.file in the worker thread; on_done(true | nil, err) is called from a later step.
function Sched:fsync(file, on_done)
  local id = self.multi:fsync(file)
  self.callbacks[id] = on_done
  return id
end

--- Sleeps (inside a task: yields; outside: blocks).
function Sched:sleep(seconds)
  if seconds <= 0 then return end
  if in_task(self) then return coroutine.yield(SLEEP, seconds) end
  self.multi:wait(seconds)
end

--- Waits until pred() is true (inside a task; outside, pred must already hold).
function Sched:wait_for(pred)
  if pred() then return end
  if not in_task(self) then error("enos.scheduler: wait_for outside a task would never end") end
  return coroutine.yield(WAIT, pred)
end

--- Inside a task: waits until someone calls signal(name). Cheaper than
-- wait_for when many tasks wait on one event (no predicate polling).
function Sched:wait_signal(name)
  if not in_task(self) then error("enos.scheduler: wait_signal outside a task would never end") end
  return coroutine.yield(SIGNAL, name)
end

--- Wakes every task waiting on `name`.
function Sched:signal(name)
  local list = self.signals[name]
  if not list then return end
  self.signals[name] = nil
  for _, co in ipairs(list) do self.ready[#self.ready + 1] = { co, n = 1 } end
end

--- Adds a task: fn(...) runs as a coroutine. Returns the task record
-- {done = bool, ok = bool, result = {…} | error = msg}.
function Sched:spawn(fn, ...)
  local co = coroutine.create(fn)
  local task = { co = co, done = false }
  self.tasks[co] = task
  self.ntasks = self.ntasks + 1
  local entry = { co, ... }
  entry.n = select("#", ...) + 1
  self.ready[#self.ready + 1] = entry
  return task
end

--- Number of tasks not finished.
function Sched:count() return self.ntasks end

local unpack = table.unpack or unpack

local resume, status = coroutine.resume, coroutine.status

-- Gives a task's transfer or job to the multi handle; one it refuses resumes the task with the error.
local function hand_over(self, co, err_kind, method, ...)
  local added, id = pcall(method, self.multi, ...)
  if added then
    self.by_id[id] = co
  else
    self.ready[#self.ready + 1] = { co, nil, { kind = err_kind, message = tostring(id) }, n = 3 }
  end
end

-- What a resumed task did: ended (ok, results…) or yielded (true, kind, what).
-- (`what`, not `arg`: in plain Lua 5.1 a vararg function's implicit `arg` hides a parameter of that name)
local function after(self, co, ok, kind, what, ...)
  if status(co) == "dead" then
    local task = self.tasks[co]
    task.done = true
    if ok then
      task.ok, task.result = true, { kind, what, ... }
    else
      task.ok, task.error = false, kind
      self.errors[#self.errors + 1] = debug.traceback(co, tostring(kind))
    end
    self.tasks[co] = nil
    self.ntasks = self.ntasks - 1
    if task.on_done then task.on_done(task) end
    return
  end
  if kind == SEND then
    hand_over(self, co, "transport", self.multi.add, what)
  elseif kind == JOB then
    hand_over(self, co, "decrypt", self.multi.decrypt, unpack(what, 1, what.n))
  elseif kind == SLEEP then
    self.sleeping[#self.sleeping + 1] = { at = self:now() + what * 1000, co = co }
  elseif kind == WAIT then
    self.waiting[#self.waiting + 1] = { pred = what, co = co }
  elseif kind == SIGNAL then
    local list = self.signals[what]
    if not list then list = {} self.signals[what] = list end
    list[#list + 1] = co
  else
    -- a plain coroutine.yield from user code: run it again on the next turn
    self.ready[#self.ready + 1] = { co, n = 1 }
  end
end

function Sched:_resume(entry)
  local co = entry[1]
  local n = entry.n or #entry
  if n == 3 then return after(self, co, resume(co, entry[2], entry[3])) end
  return after(self, co, resume(co, unpack(entry, 2, n)))
end

--- Runs one turn: resumes ready tasks, then waits at most max_wait seconds
-- for transfers or timers. Returns false when there is nothing left to do.
function Sched:step(max_wait)
  local ready = self.ready
  self.ready = {}
  for _, entry in ipairs(ready) do self:_resume(entry) end
  -- waiters whose condition holds
  if #self.waiting > 0 then
    local still = {}
    for _, w in ipairs(self.waiting) do
      if w.pred() then self.ready[#self.ready + 1] = { w.co, n = 1 } else still[#still + 1] = w end
    end
    self.waiting = still
  end
  if #self.ready > 0 then
    -- more to run now; collect finished transfers without waiting
    if self.multi:pending() > 0 then self:_collect(0) end
    return true
  end
  local now = self:now()
  local next_wake
  if #self.sleeping > 0 then
    local still = {}
    for _, s in ipairs(self.sleeping) do
      if s.at <= now then self.ready[#self.ready + 1] = { s.co, n = 1 }
      else
        still[#still + 1] = s
        if not next_wake or s.at < next_wake then next_wake = s.at end
      end
    end
    self.sleeping = still
    if #self.ready > 0 then return true end
  end
  if self.multi:pending() == 0 and not next_wake and #self.waiting == 0 and not next(self.signals) then
    return self.ntasks > 0 and #self.ready > 0
  end
  local wait = max_wait or 1
  if next_wake then wait = math.min(wait, math.max(0, (next_wake - now) / 1000)) end
  if #self.waiting > 0 then wait = math.min(wait, 0.01) end
  -- (tasks waiting on a signal are woken by signal(), e.g. from a worker job's callback: a job's
  -- completion ends the wait.) before_wait lets the owner hand work over first (a group commit);
  -- it may return the seconds after which it wants to be called again.
  if self.before_wait then
    local again = self.before_wait()
    if #self.ready > 0 then wait = 0           -- it woke someone: do not sleep on them
    elseif again and again < wait then wait = again end
  end
  self:_collect(wait)
  return true
end

-- Dispatches finished transfers to their tasks; returns the completion of
-- transfer `want` (a send outside any task) when it is among them.
function Sched:_collect(wait, want)
  local mine
  for _, done in ipairs(self.multi:wait(wait)) do
    local co = self.by_id[done.id]
    if done.id == want then
      mine = done
    elseif co then
      self.by_id[done.id] = nil
      self.ready[#self.ready + 1] = { co, done.res, done.err, n = 3 }
    else
      local cb = self.callbacks[done.id]
      if cb then
        self.callbacks[done.id] = nil
        cb(done.res, done.err)
      end
    end
  end
  return mine
end

--- Runs until every task is finished. Returns true, or false and the first
-- task error (a traceback) when a task raised.
function Sched:run()
  while self.ntasks > 0 do
    if not self:step(1) and self.ntasks > 0 and #self.ready == 0 then
      return false, "enos.scheduler: tasks are stuck (waiting on nothing)"
    end
  end
  if #self.errors > 0 then return false, self.errors[1] end
  return true
end

--- Closes the libcurl multi handle.
function Sched:close()
  if self.multi then self.multi:close() end
end

return M
