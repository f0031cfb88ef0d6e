--- The batch journal: an append-only JSON Lines file (0600), one record per
-- state change, made durable (fsync) in groups before a row counts as done.
-- It holds encrypted secrets only, never plaintext.
-- @module enos.journal
local core = require "enos.core"
local json = require "enos.json"

local M = {}

local J = {}
J.__index = J

-- The fields of a record that a resume needs (the rest is history).
local KEEP = { "state", "assetId", "productKey", "newDeviceKey", "ts", "timeout", "outcome", "line", "gateway" }

--- Reads a journal: returns {by_key = {key → last record (compact)}, header = first record, records = n} | nil, err.
-- A torn last line (the process died mid-write) is ignored. `keep_encrypted(rec)` says whether a done
-- record's encrypted secret pair must be kept (by default: always).
function M.read(path, keep_encrypted)
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local out = { by_key = {}, records = 0 }
  local lineno = 0
  local pending_bad
  for line in f:lines() do
    lineno = lineno + 1
    if pending_bad then
      f:close()
      return nil, ("journal %s: line %d is not JSON"):format(path, pending_bad)
    end
    if line ~= "" then
      local rec = json.decode(line)
      if type(rec) ~= "table" then
        pending_bad = lineno             -- fatal unless it is the last line
      else
        out.records = out.records + 1
        if rec.t == "batch" then out.header = out.header or rec
        elseif rec.key then
          local c = { jline = lineno }       -- (where it is in the journal: named when a resume refuses it)
          for _, k in ipairs(KEEP) do c[k] = rec[k] end
          if rec.encrypted and (not keep_encrypted or keep_encrypted(rec)) then c.encrypted = rec.encrypted end
          out.by_key[rec.key] = c
        end
      end
    end
  end
  f:close()
  return out
end

-- The last byte of a file and its size (nil when it cannot be read).
local function tail_of(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local size = f:seek("end")
  local last
  if size and size > 0 then
    f:seek("set", size - 1)
    last = f:read(1)
  end
  f:close()
  return size, last
end

--- Repairs a journal whose last line was torn by a crash or power cut mid-write (no final newline): a last
-- line that is a whole record gets its newline; a fragment is copied aside to `<path>.torn-<ms>` (0600) and
-- cut off (the journal is rewritten without it: a private copy, fsynced, renamed over it durably), so the
-- next record does not glue to it. Returns nil (nothing to do) | a note saying what was done | nil, err.
-- opts.label names the file in the note (default "journal"); opts.keep_whole = false sets any unterminated last
-- line aside, whole-looking or not (an output file: a credentials line cut after its secret's first bytes is
-- still a "line"; the journal, which holds the encrypted pair, re-writes it on resume).
function M.repair(path, opts)
  opts = opts or {}
  local label = opts.label or "journal"
  local size, last = tail_of(path)
  if not size or size == 0 or last == "\n" then return nil end
  local f = assert(io.open(path, "rb"))
  -- the start of the last line: search back in chunks (the fragment is at most one record)
  local cut, pos = 0, size
  while pos > 0 and cut == 0 do
    local from = math.max(0, pos - 65536)
    f:seek("set", from)
    local chunk = f:read(pos - from)
    local i = #chunk
    while i > 0 and chunk:byte(i) ~= 10 do i = i - 1 end
    if i > 0 then cut = from + i end
    pos = from
  end
  f:seek("set", cut)
  local fragment = f:read("*a")
  f:close()
  if opts.keep_whole ~= false and type(json.decode(fragment)) == "table" then
    local af, aerr = core.open_file(path, "append")
    if not af then return nil, aerr end
    local ok, werr = af:write("\n")
    if ok then ok, werr = af:sync() end
    af:close()
    if not ok then return nil, werr end
    return label .. " " .. path .. ": its last record had no line end (added)"
  end
  local aside = ("%s.torn-%d"):format(path, math.floor(core.now_ms()))
  local sf, serr = core.open_file(aside, "excl")
  if not sf then return nil, serr end
  local ok, werr = sf:write(fragment)
  if ok then ok, werr = sf:sync() end
  sf:close()
  if not ok then return nil, werr end
  -- the good prefix, copied in chunks to a private file next to the journal, then renamed over it
  local tmp = ("%s.repair-%d"):format(path, math.floor(core.now_ms()))
  local tf, terr = core.open_file(tmp, "excl")
  if not tf then return nil, terr end
  local src = assert(io.open(path, "rb"))
  local left = cut
  while left > 0 and ok do
    local chunk = src:read(math.min(left, 65536))
    if not chunk then ok, werr = nil, "short read" break end
    ok, werr = tf:write(chunk)
    left = left - #chunk
  end
  src:close()
  if ok then ok, werr = tf:sync() end
  tf:close()
  if ok then ok, werr = core.rename_durable(tmp, path) end
  if not ok then os.remove(tmp) return nil, werr end
  return ("%s %s: a torn last line (%d bytes, a crash mid-write) was set aside in %s"):format(label, path,
    #fragment, aside)
end

local function open_locked(path, how)
  local f, err = core.open_file(path, how)
  if not f then return nil, err end
  local ok, why = f:lock()
  if ok then return f end
  f:close()
  if ok == false then
    return nil, "journal " .. path .. " is in use: another batch holds its lock (still running?). Wait for it " ..
      "to end, or stop it, then --resume; two runs on one journal would replace and record the same rows twice"
  end
  return nil, "journal " .. path .. ": cannot lock it: " .. tostring(why)
end

--- Takes a journal's lock before anything else touches the batch's files: opens it (a new journal must not exist
-- unless opts.resume; it is created 0600) and locks it with an exclusive flock held until
-- the journal is closed or the process ends (kill -9 included). A second run on the same journal is refused
-- while the first one runs: two processes never append to one journal, nor repair its outputs at once.
-- Returns a lock to pass to open (opts.lock) | nil, err.
function M.lock(path, opts)
  opts = opts or {}
  local exists = io.open(path, "rb")
  if exists then
    exists:close()
    if not opts.resume then
      return nil, "journal " .. path .. " already exists: use --resume to continue that batch, or another --journal"
    end
  end
  local f, err = open_locked(path, (exists or opts.resume) and "append" or "excl")
  if not f then return nil, err end
  return { path = path, f = f, existed = exists and true or false }
end

--- Opens a journal for appending (locking it first unless opts.lock is M.lock's). opts.resume: the file may
-- exist (and is read); otherwise it must not exist. Returns journal, state | nil, err.
function M.open(path, opts)
  opts = opts or {}
  local lock, err = opts.lock
  if not lock then
    lock, err = M.lock(path, opts)
    if not lock then return nil, err end
  end
  local f = lock.f
  local state = { by_key = {}, records = 0 }
  if lock.existed then
    local note, rerr = M.repair(path)
    if rerr then f:close() return nil, "journal " .. path .. ": cannot repair its torn last line: " .. tostring(rerr) end
    if note then
      -- (a repair may have written the journal afresh: lock the file the path names now)
      f:close()
      f, err = open_locked(path, "append")
      if not f then return nil, err end
    end
    local st
    st, err = M.read(path, opts.keep_encrypted)
    if not st then f:close() return nil, err end
    st.repaired = note
    state = st
  end
  if f:mode() % 64 ~= 0 then                 -- group or other permission bits
    io.stderr:write("enos: warning: journal " .. path .. " is readable by others (mode ", string.format("%o", f:mode()), ")\n")
  end
  local self = setmetatable({ path = path, f = f, buf = {}, seq = 0, written = 0, synced = 0, fsyncs = 0,
    state = state }, J)
  return self, state
end

--- Buffers a record; returns its sequence number. Call flush() to make it durable.
function J:append(rec)
  rec.ts = rec.ts or math.floor(core.now_ms())
  self.seq = self.seq + 1
  self.buf[#self.buf + 1] = json.encode(rec) .. "\n"
  return self.seq
end

--- Writes everything buffered without waiting for the disk; self.written is the last record written.
-- Make it durable with flush(), or with an fsync of self.f elsewhere (then mark_synced).
function J:write()
  if #self.buf == 0 then return true end
  local data = table.concat(self.buf)
  local upto = self.seq
  self.buf = {}
  local ok, err = self.f:write(data)
  if not ok then return nil, err end
  self.written = upto
  return true
end

--- Writes and fsyncs everything buffered (one fsync for the group).
function J:flush()
  local ok, err = self:write()
  if not ok then return nil, err end
  if (self.written or 0) <= self.synced then return true end
  local upto = self.written
  ok, err = self.f:sync()
  if not ok then return nil, err end
  self.synced = upto
  self.fsyncs = self.fsyncs + 1
  return true
end

--- Records that everything up to record `upto` is durable (an fsync of self.f done elsewhere: the batch's
-- group commit fsyncs in a worker thread).
function J:mark_synced(upto)
  if upto > self.synced then self.synced = upto end
  self.fsyncs = self.fsyncs + 1
end

--- Whether record `seq` (append's number) is durable.
function J:durable(seq)
  return self.synced >= seq
end

--- Flushes (writes and fsyncs what is pending) and closes the journal; a second close does nothing.
function J:close()
  if self.f then
    self:flush()
    self.f:close()
    self.f = nil
  end
end

return M
