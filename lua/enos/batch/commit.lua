--- The batch's group commit, and its rule that a row counts only once its record is durable.
--
-- Each turn of the scheduler writes what rows produced (credentials first, then results, then the journal)
-- and, when no fsync is under way, hands the journal to the scheduler's worker thread for an fsync, so the disk
-- never stalls the event loop. The credentials file joins the group's fsync only when it holds a secret the
-- journal does not (V2.1's clear secrets): otherwise a done row whose credentials line a power loss took is
-- recovered on resume from the journal's encrypted pair. At most one fsync starts per commit_ms, so groups are
-- larger than one fsync's worth of rows (fsyncs cost CPU as well as time).
--
-- A row's last record goes through `finish`: the row's task ends at once (its slot goes to the next row) and
-- the row is counted (`on_durable(what)`) when its record's group is durable. Tasks waiting for a record
-- (`wait`) wake on the scheduler's signal "journal".
-- @module enos.batch.commit
local M = {}

local Commit = {}
Commit.__index = Commit

--- opts: commit_ms, on_durable(what) (what: what `finish` was given).
function M.new(sched, journal, outputs, opts)
  return setmetatable({ sched = sched, journal = journal, outputs = outputs, o = opts,
    q_seq = {}, q_what = {}, first = 1, last = 0, syncing = false, sync_err = nil, last_sync = -math.huge },
    Commit)
end

--- A row's last record: appended now, counted when durable.
function Commit:finish(row, rec, what)
  rec.key, rec.line = row.key, row.line
  self.last = self.last + 1
  self.q_seq[self.last], self.q_what[self.last] = self.journal:append(rec), what
end

--- Counts the rows whose record is durable up to `upto`.
function Commit:counted(upto)
  local q_seq, q_what = self.q_seq, self.q_what
  while self.first <= self.last and q_seq[self.first] <= upto do
    self.o.on_durable(q_what[self.first])
    q_seq[self.first], q_what[self.first] = nil, nil
    self.first = self.first + 1
  end
end

--- Waits (in a task) until record `seq` is durable.
function Commit:wait(seq)
  local journal = self.journal
  while not journal:durable(seq) do self.sched:wait_signal("journal") end
end

-- A failed write stops the batch naming the file (the journal stays whole: its records are lines).
local function wrote(what, ok, err)
  if not ok then
    error(("cannot write the %s: %s; free the space, then resume"):format(what,
      (tostring(err):gsub("^write failed: ", ""))), 0)
  end
end

--- One turn: writes, and starts a group fsync when due. Returns how long until the next may start
-- (seconds) | nil. Raises when a write failed; an fsync's failure is kept (`failed()`).
function Commit:turn()
  local journal, sched = self.journal, self.sched
  local ok, what, err = self.outputs:write()
  if not ok then wrote(what, nil, err) end
  wrote("journal " .. journal.path, journal:write())
  if journal.written <= journal.synced or self.syncing then return end
  local now = sched.now()
  if now - self.last_sync < self.o.commit_ms then return (self.last_sync + self.o.commit_ms - now) / 1000 end
  self.last_sync = now
  local cred_f = self.outputs:take_sync()
  self.syncing = true
  local upto, left = journal.written, cred_f and 2 or 1
  local function done(fok, ferr)
    if not fok then self.sync_err = ferr or "fsync failed" end
    left = left - 1
    if left > 0 then return end
    self.syncing = false
    journal:mark_synced(upto)
    self:counted(upto)
    sched:signal("journal")
  end
  if cred_f then sched:fsync(cred_f, done) end
  sched:fsync(journal.f, done)
end

--- The error of a failed group fsync, or nil.
function Commit:failed()
  return self.sync_err
end

return M
