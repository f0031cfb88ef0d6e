--- The batch's reader: the plan read a window at a time (read_batch rows), each window's devices read in
-- bulk, and a queue of read rows kept ahead of the workers.
--
-- * A row the journal does not know (or knows as failed: it runs again) has its device read with the window's
--   other rows in one Search Device (enos.bulk, search only): the workflow's preflight then checks what was
--   read (`row.device`) instead of reading the device again. A row the search did not settle has no
--   `row.device`: the workflow reads it alone.
-- * A row the journal left in flight ("sending", "unknown") is reconciled with the window's others in one
--   read (enos.reconcile.window, with the secret when wanted), once the request must have ended: after its
--   timeout (for "sending") and the settle time. `row.back` carries the verdict.
-- * With reverify, a row the journal says is done is read back the same way (no wait).
-- * A row the journal says is done is not read.
-- @module enos.batch.reader
local plan_mod = require "enos.plan"
local workflow = require "enos.workflow"
local bulk = require "enos.bulk"
local reconcile = require "enos.reconcile"
local core = require "enos.core"

local M = {}

local Reader = {}
Reader.__index = Reader

--- A reader over `rows` (a plan row iterator: {line, fields, extra} | false for a blank row | nil at the end).
-- opts: read_batch, ahead (rows kept ready), read_attempts, max_retry_after, settle_ms, timeout (the client's,
-- seconds: how long a request in flight at a crash may have lasted), require_secret, reverify, by_key (the
-- journal's last record per row key), pause(attempt) (between the lone reads of a row still unclear).
function M.new(sched, client, rows, opts)
  return setmetatable({ sched = sched, client = client, rows = rows, o = opts, ready = {}, first = 1, last = 0,
    exhausted = false, stats = { reads = 0, reconciled_in_bulk = 0 } }, Reader)
end

--- The next plan row as a batch row: {line, target, key, assetId, extra} | nil at the end (blank rows skipped).
function Reader:plan_row()
  while true do
    local row = self.rows()
    if row == nil then return nil end
    if row then
      local t = workflow.checked_target(assert(plan_mod.check_row(row.fields)))
      return { line = row.line, target = t, key = plan_mod.target_key(t), assetId = t.assetId, extra = row.extra }
    end
  end
end

-- The row's device as the workflow's preflight may take it (the device the target names, without secrets),
-- or nil.
local function preflight_device(t, d)
  if not d then return nil end
  if (t.assetId and d.assetId ~= t.assetId) or (not t.assetId and
      (d.productKey ~= t.productKey or d.deviceKey ~= t.deviceKey)) then
    return nil
  end
  d.deviceSecret, d.sessionKey, d.encrypted = nil, nil, nil
  return d
end

--- Reads one window: the fresh rows' devices in one search, the in-flight and re-verified rows' read-backs
-- in one more. Sets row.device / row.assetId and row.back.
function Reader:read_window(win)
  local o, sched = self.o, self.sched
  local sleep = function(sec) sched:sleep(sec) end
  local fresh, targets, back, items, ready_at = {}, {}, {}, {}, 0
  for _, row in ipairs(win) do
    local prev = o.by_key[row.key]
    if not prev or prev.state == "failed" then
      fresh[#fresh + 1] = row
      targets[#targets + 1] = row.target
    elseif prev.state == "sending" or prev.state == "unknown" or (prev.state == "done" and o.reverify) then
      back[#back + 1] = row
      items[#items + 1] = { target = row.target, assetId = prev.assetId }
      -- a request in flight at the crash may still be on its way or being handled: trust a read only once it
      -- must have ended (its timeout) plus the settle time ("unknown" was written after it ended)
      if prev.state ~= "done" then
        local in_flight = prev.state == "sending" and (prev.timeout or o.timeout) * 1000 or 0
        ready_at = math.max(ready_at, (prev.ts or 0) + in_flight + o.settle_ms)
      end
    end
  end
  if #targets > 0 then
    self.stats.reads = self.stats.reads + 1
    local res = bulk.read(self.client, targets, { window = o.read_batch, search_only = true, sleep = sleep,
      read_attempts = o.read_attempts, max_retry_after = o.max_retry_after })
    for k, row in ipairs(fresh) do
      local d = res[k] and res[k].device
      if d then row.device, row.assetId = d, d.assetId end
    end
  end
  if #items > 0 then
    local wait = ready_at - core.now_ms()
    if wait > 0 then sched:sleep(wait / 1000) end
    local verdicts = reconcile.window(self.client, items, { window = o.read_batch, require_secret = o.require_secret,
      read_attempts = o.read_attempts, max_retry_after = o.max_retry_after, sleep = sleep, pause = o.pause })
    self.stats.reconciled_in_bulk = self.stats.reconciled_in_bulk + #items
    for k, row in ipairs(back) do
      local v = verdicts[k]
      row.back = v
      if v.state == "not_done" then
        local d = preflight_device(row.target, v.device)
        if d then row.device, row.assetId = d, d.assetId end
      end
    end
  end
end

--- The reader's task: fills the queue a window at a time, `ahead` rows ahead of the workers.
function Reader:run()
  local o, sched = self.o, self.sched
  while not self.exhausted do
    if self.last - self.first + 1 >= o.ahead then sched:wait_signal("need_rows")
    else
      local win, eof = {}, false
      while #win < o.read_batch do
        local row = self:plan_row()
        if not row then eof = true break end
        win[#win + 1] = row
      end
      self:read_window(win)
      for _, row in ipairs(win) do self.last = self.last + 1 self.ready[self.last] = row end
      self.exhausted = eof        -- (only now: a worker that finds the queue empty and the plan read ends)
      sched:signal("rows")
    end
  end
  sched:signal("rows")
end

--- The next row for a worker (waits for the reader) | nil when the plan is done.
function Reader:next()
  local sched = self.sched
  while true do
    if self.first <= self.last then
      local row = self.ready[self.first]
      self.ready[self.first] = nil
      self.first = self.first + 1
      sched:signal("need_rows")
      return row
    end
    if self.exhausted then return nil end
    sched:wait_signal("rows")
  end
end

return M
