--- The batch's verification in bulk. A replaced row waits here until settle_ms after its reply (EnOS: a
-- write shows in reads after about 2 s); then a window of such rows is read back in one Search Device and
-- judged as the workflow's verify step judges (workflow.check_replaced). A row the search disagrees with or
-- misses is read alone with Get Device before anything is concluded (a search index can lag). The verdict
-- goes to `on_verified(row, report, problems, notes)`.
--
-- A window goes when read_batch rows have settled, when the oldest has waited twice the settle time, or,
-- once no worker is left, when the last one has settled (fewer, fuller reads).
-- @module enos.batch.verifier
local workflow = require "enos.workflow"
local bulk = require "enos.bulk"

local M = {}

local Verifier = {}
Verifier.__index = Verifier

--- A verifier that reads rows back through `client`, its waits run by `sched` (enos.scheduler).
-- opts: read_batch, settle_ms, read_attempts, max_retry_after, on_verified(row, report, problems, notes).
function M.new(sched, client, opts)
  return setmetatable({ sched = sched, client = client, o = opts, q = {}, first = 1, last = 0, producers = 0,
    reads = 0 }, Verifier)
end

--- A row replaced (report.new: its new credentials, report.old: its device before) to verify.
function Verifier:add(row, report)
  self.last = self.last + 1
  self.q[self.last] = { row = row, report = report, at = self.sched.now() }
  self.sched:signal("verify")
end

--- How many tasks may still add rows; `done()` when one ends.
function Verifier:expect(n) self.producers = n end

--- One task that added rows has ended (see `expect`).
function Verifier:done()
  self.producers = self.producers - 1
  self.sched:signal("verify")
end

-- Judges one device read against what the row's replace asked for: problems, notes.
local function judge(d, want, err)
  local problems, notes = {}, {}
  if d then workflow.check_replaced(d, want, problems, notes)
  else problems[1] = "cannot read the device back: " .. tostring(err) end
  return problems, notes
end

--- Reads back the settled rows at the head of the queue (at most read_batch) and hands each its verdict.
function Verifier:window(now)
  local o, sched = self.o, self.sched
  local settle = o.settle_ms
  local batch = {}
  while self.first <= self.last and #batch < o.read_batch and self.q[self.first].at + settle <= now do
    batch[#batch + 1] = self.q[self.first]
    self.q[self.first] = nil
    self.first = self.first + 1
  end
  local sleep = function(sec) sched:sleep(sec) end
  local targets = {}
  for k, v in ipairs(batch) do targets[k] = { assetId = v.report.new.assetId, orgId = v.row.target.orgId } end
  self.reads = self.reads + 1
  local res = bulk.read(self.client, targets, { window = o.read_batch, sleep = sleep,
    read_attempts = o.read_attempts, max_retry_after = o.max_retry_after })
  for k, v in ipairs(batch) do
    local want = { assetId = v.report.new.assetId, newDeviceKey = v.row.target.newDeviceKey,
      productKey = v.report.old and v.report.old.productKey }
    local d = res[k] and res[k].device
    local problems, notes = judge(d, want, res[k] and res[k].err)
    if #problems > 0 and d then
      -- the search may lag: one Get Device for this row before concluding
      local one = bulk.read(self.client, { targets[k] }, { window = 1, read_attempts = o.read_attempts,
        sleep = sleep, max_retry_after = o.max_retry_after, search = false })
      d = one[1] and one[1].device
      problems, notes = judge(d, want, one[1] and one[1].err)
    end
    if d then v.report.new.status = d.status end
    o.on_verified(v.row, v.report, problems, notes)
  end
end

--- The verifier's task: runs until the queue is empty and no producer is left.
function Verifier:run()
  local o, sched = self.o, self.sched
  local settle = o.settle_ms
  while true do
    if self.first > self.last then
      if self.producers == 0 then return end
      sched:wait_signal("verify")
    else
      local now, n, W, q = sched.now(), self.last - self.first + 1, o.read_batch, self.q
      local full_at = n >= W and q[self.first + W - 1].at + settle or math.huge
      local last_at = self.producers == 0 and q[self.last].at + settle or math.huge
      local go_at = math.min(full_at, last_at, q[self.first].at + 2 * settle)
      if go_at > now then
        -- (in steps: the last worker's end moves go_at earlier, and a sleep is not woken by a signal)
        sched:sleep(math.max(math.min(go_at - now, 100), 1) / 1000)
      else
        self:window(now)
      end
    end
  end
end

return M
