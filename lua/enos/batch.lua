--- Fleet-scale batch replacement: a streamed plan, each row the replacement
-- workflow in a coroutine over libcurl multi, a shared token, a QPS cap,
-- backpressure on 429/503, a durable journal, and resume after a crash.
-- @module enos.batch
local core = require "enos.core"
local errors = require "enos.errors"
local json = require "enos.json"
local plan_mod = require "enos.plan"
local journal_mod = require "enos.journal"
local scheduler = require "enos.scheduler"
local workflow = require "enos.workflow"
local bulk = require "enos.bulk"

local M = {}

--- Options and their types (anything else is refused, so a typo is not silently ignored).
M.OPTIONS = {
  concurrency = "number", qps = "number", retry_attempts = "number", backoff_ms = "number",
  backoff_max_ms = "number", verify = "boolean", check_free = "boolean", max_attempts = "number", read_attempts = "number",
  progress_interval = "number", settle_ms = "number", out = "string", format = "string", journal = "string",
  results = "string", commit_ms = "number", resume = "boolean", require_secret = "boolean", progress = "any",
  plan_format = "string", reverify = "boolean", max_retry_after = "number", read_batch = "number",
}

M.DEFAULTS = {
  concurrency = 8,
  qps = nil,               -- requests per second cap (token bucket); nil: none
  retry_attempts = 8,      -- sends of one request refused with 429 (or 503 for reads)
  backoff_ms = 250,        -- full-jitter exponential backoff base
  backoff_max_ms = 30000,
  verify = true,
  check_free = false,      -- the replace's own 11702 already refuses a taken key, changing nothing
  max_attempts = 8,        -- replace attempts per row (the workflow reads back between them)
  read_attempts = 8,       -- attempts of each read (preflight, read-back, verify) a dropped connection fails
  progress_interval = 5,   -- seconds between plain progress lines (not a terminal)
  commit_ms = 3,           -- group commit: at most one journal fsync started per commit_ms
  max_retry_after = 300,   -- seconds: the longest Retry-After honoured (the pause is shown in progress)
  read_batch = 100,        -- rows read in one Search Device (the preflight and the verification, in bulk)
}

-- ---------------------------------------------------------------- output files

local Out = {}
Out.__index = Out

-- An append-only output (credentials or results), 0600, buffered and flushed in groups.
local function open_out(path, columns, format, resume)
  local f, created = core.open_file(path, resume and "append" or "excl")
  if not f then
    local err = created
    if not resume and err and err:find("File exists", 1, true) then
      err = path .. " already exists: choose another file, or --resume the batch that wrote it"
    end
    return nil, err
  end
  local self = setmetatable({ path = path, f = f, buf = {}, columns = columns, format = format }, Out)
  if format == "csv" and (created or not resume) then
    local names = {}
    for _, c in ipairs(columns) do names[c] = c end
    self.buf[1] = core.csv_row(names, columns)          -- the header: each column its own name
  end
  return self
end

function Out:add(rec)
  if self.format == "jsonl" then
    self.buf[#self.buf + 1] = json.encode(rec) .. "\n"
  else
    -- quoted when needed; a cell a spreadsheet would evaluate (= + @ -…) gets a leading '
    self.buf[#self.buf + 1] = core.csv_row(rec, self.columns)
  end
end

-- Writes what is buffered (made durable by the batch's group commit, and at close).
function Out:flush()
  if #self.buf == 0 then return true end
  local data = table.concat(self.buf)
  self.buf = {}
  return self.f:write(data)
end

function Out:close()
  if self.f then
    self:flush()
    self.f:sync()
    self.f:close()
    self.f = nil
  end
end

-- New keys already present in a credentials file (to not write a row twice on resume).
local function keys_in(path, format)
  local present = {}
  local f = io.open(path, "rb")
  if not f then return present end
  local header
  for line in f:lines() do
    if format == "jsonl" then
      local r = json.decode(line)
      if type(r) == "table" and r.deviceKey then present[r.deviceKey] = true end
    else
      local cells = plan_mod.split_csv(line)
      if cells then
        if not header then
          header = { n = #cells }
          for i, c in ipairs(cells) do header[c] = i end
        elseif header.deviceKey and #cells == header.n and cells[header.deviceKey] then
          present[cells[header.deviceKey]] = true
        end
      end
    end
  end
  f:close()
  return present
end

-- ---------------------------------------------------------------- helpers

local function format_of(path, given)
  if given then return given end
  if path and (path:match("%.jsonl$") or path:match("%.ndjson$")) then return "jsonl" end
  return "csv"
end

local function err_fields(e)
  if not e then return nil end
  return { kind = e.kind, code = e.code, status = e.status, message = e.message, request_id = e.request_id }
end

local function human_rate(n, secs)
  if secs <= 0 then return 0 end
  return n / secs
end

--- The plan source: a path, or a function returning a fresh row iterator.
local function plan_rows(plan, format)
  if type(plan) == "string" then
    local reader, err = plan_mod.open(plan, format)
    if not reader then return nil, err end
    return reader:rows(), function() reader:close() end
  elseif type(plan) == "function" then
    return plan(), function() end
  end
  error("enos.batch: plan must be a path or a function returning an iterator", 3)
end

--- Checks a plan without sending anything: {rows, error_count, errors = {{line, message}…}}.
function M.check(plan, opts)
  opts = opts or {}
  if type(plan) == "string" then return plan_mod.check(plan, opts.format, opts.max_errors) end
  -- an iterator factory: the same checks over its rows
  local tmp = os.tmpname()
  local out = assert(io.open(tmp, "wb"))
  for row in plan() do
    if row then out:write(json.encode(row.fields), "\n") end
  end
  out:close()
  local res, err = plan_mod.check(tmp, "jsonl", opts.max_errors)
  os.remove(tmp)
  return res, err
end

--- The check as a gate: the check's result when the plan has no error, else nil and an `invalid_argument`
-- error naming the first one (err.check holds them all).
function M.checked(plan, opts)
  local chk, cerr = M.check(plan, opts)
  if not chk then return nil, errors.new("invalid_argument", tostring(cerr)) end
  if chk.error_count > 0 then
    local first = chk.errors[1]
    local e = errors.new("invalid_argument", ("the plan has %d error(s); nothing was sent. Line %d: %s")
      :format(chk.error_count, first.line, first.message))
    e.check = chk
    return nil, e
  end
  return chk
end

-- ---------------------------------------------------------------- resume: the journal against its plan

--- Checks, before anything is sent, that a journal being resumed belongs to this plan: the plan's fingerprint
-- must be the header's, and every done record's new key (and asset, where the plan names one) must be its plan
-- row's. With reverify, a difference is no error: the done rows are read back from the platform instead
-- (state.reverify). Returns nil | an error naming the journal line and the plan line.
function M.check_resume(state, plan, src, o)
  local h = state.header or {}
  if h.plan_sha256 and src.fp and (h.plan_sha256 ~= src.fp.sha256 or h.plan_size ~= src.fp.size) then
    if not o.reverify then
      return errors.new("invalid_argument", ("the plan %s is not the one journal was started with (%d bytes then, " ..
        "%d now): resume with the original plan, or add --reverify to read every done row back from the " ..
        "platform and trust only what it shows"):format(src.name, tonumber(h.plan_size) or -1, src.fp.size),
        { field = "plan" })
    end
    state.reverify = true
    return nil
  end
  local rows, close = plan_rows(plan, src.format or o.plan_format)
  local bad
  for row in rows do
    if row then
      local t = plan_mod.check_row(row.fields)
      local prev = t and state.by_key[plan_mod.target_key(t)]
      if prev and prev.state == "done" and (prev.newDeviceKey ~= t.newDeviceKey or
          (t.assetId and prev.assetId and prev.assetId ~= t.assetId)) then
        bad = ("journal line %d says plan line %d is done with newDeviceKey %s, but the plan's line %d asks for %s")
          :format(prev.jline or 0, tonumber(prev.line) or 0, plan_mod.excerpt(prev.newDeviceKey), row.line,
            t.newDeviceKey)
        break
      end
    end
  end
  close()
  if bad and not o.reverify then
    return errors.new("invalid_argument", bad .. ": this journal does not belong to this plan (or was altered); " ..
      "add --reverify to read the done rows back from the platform and trust only what it shows", { field = "journal" })
  end
  if bad then state.reverify = true end
  return nil
end

-- ---------------------------------------------------------------- reading a row back

--- Reads a row's device back to learn whether its replace happened: the device the plan names (its
-- assetId; else the journal's; else the product's device holding the new key), read with the secret when
-- one is wanted. Returns the device when it shows the plan's new key and its secret is in hand; nil when it
-- does not show the new key (not done: safe to run); false when it cannot be told (unreadable, or the new
-- key without a usable secret: resume again).
function M._read_row(client, t, prev, require_secret, attempts, pause)
  local asset = t.assetId or (prev and prev.assetId)
  local ident = asset and { assetId = asset, orgId = t.orgId }
    or { productKey = t.productKey, deviceKey = t.newDeviceKey, orgId = t.orgId }
  ident.requireSecret = require_secret or nil
  for attempt = 1, attempts do
    local d, err = client:get_device(ident)
    -- (another device answering teaches nothing: read again)
    local other = d and ((asset and d.assetId ~= asset) or (t.productKey and d.productKey ~= t.productKey))
    if d and not other then
      if d.deviceKey ~= t.newDeviceKey then return nil end
      if workflow.secret_in_hand(client, require_secret, d) then return d end
    elseif not d and (err.kind == "not_found" or (err.kind == "invalid_argument" and err.code == 99400 and not asset)) then
      return nil
    end
    if attempt < attempts then pause(attempt) end
  end
  return false
end

-- ---------------------------------------------------------------- the key proof

--- Reads the first plan rows' devices with requireSecret (at most 3 rows) until one answers, and checks that
-- its current secret decrypts with the client's private key. Returns "proven" | "not proven: why" (nothing
-- to prove without a private key or on V2.1), or nil, err (a `config` error: the key does not match).
function M.prove_key(client, plan, o)
  o = o or {}
  local require_secret = o.require_secret
  if require_secret == nil then require_secret = true end
  if client.api_version == "v2.1" or not require_secret or not client:has_private_key() then return "not needed" end
  local rows, close = plan_rows(plan, o.plan_format)
  if not rows then return "not proven: " .. tostring(close) end
  local why = "no readable row"
  local tried = 0
  while tried < 3 do
    local row = rows()
    if row == nil then break end
    local t = row and plan_mod.check_row(row.fields)
    if t then
      tried = tried + 1
      local ident = t.assetId and { assetId = t.assetId, orgId = t.orgId }
        or { productKey = t.productKey, deviceKey = t.deviceKey, orgId = t.orgId }
      ident.requireSecret = true
      local d, err = client:get_device(ident)
      if d then
        local unproven = not d.encrypted and not d.err
        local e = not unproven and workflow.key_proof_error(d)
        d.deviceSecret, d.encrypted = nil, nil
        if e then close() return nil, e end
        if not unproven then close() return "proven" end
        why = "the platform returned no secret for line " .. row.line
      elseif err.kind == "config" or err.kind == "auth" then
        close()
        return nil, err
      else
        why = tostring(err)
      end
    end
  end
  close()
  return "not proven: " .. why
end

-- ---------------------------------------------------------------- the run

--- Runs a batch. Returns summary | nil, err (err.check holds plan errors when
-- the check failed; then nothing was sent).
-- opts: concurrency, qps, out (credentials file), format (csv|jsonl), journal,
-- results, resume, require_secret, verify, check_free, progress (true | function(p)),
-- retry_attempts (sends of a request refused with 429/503), max_attempts (replace attempts), read_attempts
-- (attempts of each read), backoff_ms, backoff_max_ms (the 429 pause and the workflow's retries), settle_ms,
-- commit_ms. Sleep-free: the scheduler does the waiting.
function M.run(client, plan, opts)
  if type(client) ~= "table" then error("enos.batch.run: client expected", 2) end
  if opts ~= nil and type(opts) ~= "table" then error("enos.batch.run: opts must be a table", 2) end
  opts = opts or {}
  local o = {}
  for k, v in pairs(M.DEFAULTS) do o[k] = v end
  for k, v in pairs(opts) do
    local want = M.OPTIONS[k]
    if not want then return nil, errors.arg(tostring(k), "unknown batch option '" .. tostring(k) .. "'") end
    if want ~= "any" and type(v) ~= want then return nil, errors.arg(k, k .. " must be a " .. want) end
    o[k] = v
  end
  if type(o.concurrency) ~= "number" or o.concurrency < 1 or o.concurrency > 1024 or o.concurrency % 1 ~= 0 then
    return nil, errors.arg("concurrency", "concurrency must be an integer 1-1024")
  end
  if type(o.read_batch) ~= "number" or o.read_batch < 1 or o.read_batch > 200 or o.read_batch % 1 ~= 0 then
    return nil, errors.arg("read_batch", "read_batch must be an integer 1-200")
  end
  if o.qps ~= nil and (type(o.qps) ~= "number" or o.qps <= 0) then
    return nil, errors.arg("qps", "qps must be a positive number")
  end
  for _, k in ipairs { "retry_attempts", "max_attempts", "read_attempts" } do
    if o[k] < 1 or o[k] % 1 ~= 0 then return nil, errors.arg(k, k .. " must be an integer >= 1") end
  end
  for _, k in ipairs { "backoff_ms", "backoff_max_ms", "settle_ms", "progress_interval", "commit_ms", "max_retry_after" } do
    if o[k] ~= nil and o[k] < 0 then return nil, errors.arg(k, k .. " must be a number >= 0") end
  end
  if o.format ~= nil and o.format ~= "csv" and o.format ~= "jsonl" then
    return nil, errors.arg("format", "format must be csv or jsonl")
  end
  for _, k in ipairs { "out", "journal", "results" } do
    if o[k] ~= nil and (o[k] == "" or o[k]:sub(-1) == "/") then return nil, errors.arg(k, k .. " must be a file path") end
  end
  if o.progress ~= nil and o.progress ~= true and o.progress ~= false and type(o.progress) ~= "function" then
    return nil, errors.arg("progress", "progress must be a boolean or a function")
  end

  -- 0. Four different files: the plan, the journal, the credentials and the results. Any two that are one
  -- file (the same path, another spelling, a symlink, a hard link) would overwrite or append into each other.
  local plan_name = type(plan) == "string" and plan or nil
  local jpath = o.journal or (plan_name and plan_name .. ".journal")
  if not jpath then return nil, errors.arg("journal", "a journal path is required") end
  local rpath = o.results or (jpath:gsub("%.journal$", "") .. ".results.csv")
  do
    local seen = {}
    for _, f in ipairs { { "plan", plan_name }, { "journal", jpath }, { "out", o.out }, { "results", rpath } } do
      if f[2] then
        local id = M.file_identity(f[2])
        local other = seen[id]
        if other then
          return nil, errors.arg(f[1], ("%s %s and %s %s are the same file: give each its own"):format(other[1],
            other[2], f[1], f[2]))
        end
        seen[id] = f
      end
    end
    -- what is there must be a regular file (a FIFO would block the batch, a device would swallow secrets);
    -- a resume appends secrets only to a credentials file no one else can read
    for _, f in ipairs { { "journal", jpath }, { "out", o.out }, { "results", rpath } } do
      local st = f[2] and core.stat(f[2])
      if st and st.type ~= "file" then
        return nil, errors.arg(f[1], ("%s %s is a %s, not a regular file"):format(f[1], f[2], st.type))
      end
      if st and o.resume and f[1] == "out" and st.mode % 64 ~= 0 then
        return nil, errors.new("config", ("credentials file %s can be read by other users (mode %o): the resume " ..
          "would add secrets to it. Make it private (chmod 600 %s), then resume"):format(f[2], st.mode, f[2]),
          { field = "out" })
      end
    end
    -- every output refused before the journal is created: a typo must not leave a journal behind
    for _, f in ipairs { { "journal", jpath }, { "out", o.out }, { "results", rpath } } do
      if f[2] and not (o.resume and f[1] ~= "journal") then
        local ok, werr = workflow.check_writable(f[2], o.resume and f[1] == "journal")
        if not ok then
          werr.field = f[1]
          if f[1] == "journal" and not o.resume and werr.message:find("exists", 1, true) then
            werr.message = "journal " .. f[2] .. " already exists: use resume to continue that batch, or another journal"
          end
          return nil, werr
        end
      end
    end
  end

  -- The rows that run are exactly the rows that were checked: the check and the run read a private
  -- snapshot of the plan, taken now; its size and SHA-256 go into the journal's header, and a resume with a
  -- plan that differs is refused (unless reverify). Rows added to the plan while the batch runs do not run.
  -- (A plan given as an iterator is the caller's to keep stable; on resume its rows are checked one by one.)
  local src = { name = plan_name or "(iterator)" }
  local snap
  if plan_name then
    local fp, serr = plan_mod.snapshot(plan_name, o.plan_format)
    if not fp then return nil, errors.new("invalid_argument", serr) end
    snap, src.fp, src.format = fp.path, fp, fp.format
  end
  local ok, r1, r2 = pcall(M._run_checked, client, snap or plan, o, src, jpath, rpath)
  if snap then os.remove(snap) end
  if not ok then error(r1, 0) end
  return r1, r2
end

--- The identity of a path for "are these the same file": the file's device and inode when it exists
-- (symlinks and hard links resolved), else its directory's and its name.
function M.file_identity(path)
  local st = core.stat(path)
  if st then return "file " .. st.id end
  local dir, base = path:match("^(.*)/([^/]*)$")
  if not dir then dir, base = ".", path end
  if dir == "" then dir = "/" end
  local dst = core.stat(dir)
  if dst then return "dir " .. dst.id .. "/" .. base end
  return "path " .. path
end

-- The run, once the options and the files are checked. plan: the snapshot's path or an iterator factory.
function M._run_checked(client, plan, o, src, jpath, rpath)
  -- 1. Check the whole plan before the first request.
  local chk, cerr = M.checked(plan, { format = src.format or o.plan_format })
  if not chk then return nil, cerr end

  collectgarbage()          -- the check's sets are garbage now: don't carry them into the run


  -- 2. Files: journal (required for durability), credentials, results (their paths checked by M.run).
  -- Prove the private key after the paths are checked (bad input is refused before any request) and before
  -- anything is written or changed: once for the batch, on the first plan row whose device can be read (its
  -- current secret must decrypt), not once per row.
  -- (a resume proves it after its journal is checked against the plan: a refused resume sends nothing)
  local proof, perr
  local function prove()
    proof, perr = M.prove_key(client, plan, { require_secret = o.require_secret, plan_format = src.format or o.plan_format })
    return perr
  end
  if not o.resume and prove() then return nil, perr end
  local require_secret = o.require_secret
  if require_secret == nil then require_secret = client.api_version ~= "v2.1" and client:has_private_key() end
  if client.api_version == "v2.1" then require_secret = false end

  local cred, results
  local present = {}          -- new keys already in the credentials file (filled on resume only)
  local cred_format = format_of(o.out, o.format)
  local warnings = {}
  if o.resume then
    -- a credentials or results line cut by a crash or a full disk: set aside and cut, so that its row is
    -- written again (from the journal) instead of counting as delivered, and nothing glues to it
    for _, out in ipairs { { o.out, "credentials file" }, { rpath, "results file" } } do
      if out[1] then
        local note, rerr = journal_mod.repair(out[1], { label = out[2], keep_whole = false })
        if rerr then return nil, errors.new("config", "cannot repair " .. out[1] .. ": " .. tostring(rerr)) end
        if note then warnings[#warnings + 1] = note end
      end
    end
  end
  if o.out and o.resume then present = keys_in(o.out, cred_format) end
  local journal, jstate = journal_mod.open(jpath, { resume = o.resume,
    keep_encrypted = function(rec) return o.out ~= nil and not present[rec.newDeviceKey] end })
  if not journal then return nil, errors.new("config", tostring(jstate)) end
  if jstate.repaired then warnings[#warnings + 1] = jstate.repaired end
  if not o.resume or journal.state.records == 0 then
    if o.resume and prove() then journal:close() return nil, perr end
    journal:append { t = "batch", plan = src.name, rows = chk.rows, version = core._VERSION,
      plan_size = src.fp and src.fp.size, plan_sha256 = src.fp and src.fp.sha256 }
  else
    -- 2b. A resume trusts its journal only for the plan it was written for, row by row.
    local bad = M.check_resume(journal.state, plan, src, o) or prove()
    if bad then
      journal:close()
      return nil, bad
    end
    if not (journal.state.header and journal.state.header.plan_sha256) and src.fp then
      warnings[#warnings + 1] = "journal " .. jpath .. " was written by an older enos (no plan fingerprint): " ..
        "its done rows were checked against the plan one by one"
    end
  end
  if o.out then
    local cols = { "line", "assetId", "productKey", "deviceKey", "deviceSecret", "encryptedSecret", "sessionKey",
      "outcome" }
    for _, x in ipairs(chk.extra_columns or {}) do cols[#cols + 1] = x end
    local r, err = open_out(o.out, cols, cred_format, o.resume)
    if not r then journal:close() return nil, errors.new("config", err) end
    cred = r
  end
  do
    local cols = { "line", "target", "newDeviceKey", "assetId", "outcome", "error_kind", "error_code", "message" }
    for _, x in ipairs(chk.extra_columns or {}) do cols[#cols + 1] = x end
    local r, err = open_out(rpath, cols, format_of(rpath), o.resume)
    if not r then journal:close() if cred then cred:close() end return nil, errors.new("config", err) end
    results = r
  end

  -- 3. The scheduler and the transport every row shares.
  local topts, given = client:transport_options()
  local own = given == nil
  local sched = scheduler.new(own and {
    timeout = topts.timeout, connect_timeout = topts.connect_timeout,
    cafile = topts.cafile, capath = topts.capath,
    verify_tls = topts.verify_tls, user_agent = topts.user_agent,
    max_body = topts.max_body, max_connections = o.concurrency * 2,
  } or { multi = core.multi {} })
  local base = own and sched.transport or given
  local row_of = {}            -- coroutine → row
  local reverify = o.reverify or journal.state.reverify
  local stats = { total = chk.rows, done = 0, replaced = 0, reconciled = 0, skipped = 0, reverified = 0, failed = 0,
    failed_by_kind = {}, retries = 0, requests = 0 }
  local pause_until = 0
  local bucket = { tokens = o.qps and math.max(1, o.qps) or 0, at = sched.now() }
  local rnd = math.random

  local function acquire()
    if pause_until > 0 then                -- (set by a 429/503; no clock read otherwise)
      local now = sched.now()
      if now < pause_until then sched:sleep((pause_until - now) / 1000) else pause_until = 0 end
    end
    if o.qps then
      while true do
        local now = sched.now()
        bucket.tokens = math.min(math.max(1, o.qps), bucket.tokens + (now - bucket.at) / 1000 * o.qps)
        bucket.at = now
        if bucket.tokens >= 1 then bucket.tokens = bucket.tokens - 1 break end
        sched:sleep((1 - bucket.tokens) / o.qps)
      end
    end
  end

  -- The "sending" record: durable before a replace leaves, so that a crash from then on is reconciled
  -- on resume (read back after ts + timeout + settle). A row writes it when it starts, so its fsync
  -- overlaps the preflight; a replace sent later than half the settle time after it writes a fresh one.
  local function sending(row, timeout)
    local rec = { key = row.key, line = row.line, state = "sending", assetId = row.assetId,
      newDeviceKey = row.target.newDeviceKey, timeout = timeout }
    row.sending_seq = journal:append(rec)
    row.sending_ts = rec.ts                  -- the time a resume will count from
  end
  local sending_slack = (o.settle_ms or 2000) / 2
  -- exponential backoff's ceiling after `attempt` tries (ms): the 429 pause and the resume's read-back
  local function backoff_cap(attempt) return math.min(o.backoff_max_ms, o.backoff_ms * 2 ^ attempt) end

  local transport = {
    wait_for = function(_, pred) return sched:wait_for(pred) end,
    decrypt = base.decrypt and function(_, ...) return base:decrypt(...) end,
    send = function(_, req)
      local row = row_of[coroutine.running() or false]
      local is_replace = req.call == "replace_device"       -- (named by the client: never guessed from a URL)
      local attempt = 0
      while true do
        attempt = attempt + 1
        acquire()
        if row and is_replace then      -- (each attempt: a 429 retry may leave much later)
          -- a record that ages past the slack while its fsync is awaited is written afresh, once (a fresh
          -- record whose fsync alone takes longer than that: the disk's own pace, nothing would be quicker)
          for _ = 1, 2 do
            local fresh = not row.sending_seq or core.now_ms() - row.sending_ts > sending_slack
            if fresh then sending(row, req.timeout) end
            if journal.synced >= row.sending_seq then break end      -- (durable already: no wait, no aging)
            repeat sched:wait_signal("journal") until journal.synced >= row.sending_seq
            if fresh or core.now_ms() - row.sending_ts <= sending_slack then break end
          end
        end
        stats.requests = stats.requests + 1
        local res, err = base:send(req)
        local st = res and res.status
        local safe_retry = st == 429 or (st == 503 and not is_replace)
        if not safe_retry or attempt >= o.retry_attempts then return res, err end
        -- backpressure for everyone: honour Retry-After, else full-jitter exponential backoff
        local ra = tonumber(res.headers and res.headers["retry-after"])
        if ra and ra > o.max_retry_after then
          stats.retry_after_cut = math.max(stats.retry_after_cut or 0, ra)
          ra = o.max_retry_after
        end
        local delay = ra and math.max(ra, 0) * 1000 or rnd() * backoff_cap(attempt)
        pause_until = math.max(pause_until, sched.now() + delay)
        stats.retries = stats.retries + 1
      end
    end,
  }
  local restore_transport = client:use_transport(transport)

  local t0 = sched.now()
  local function progress(final)
    if not o.progress then return end
    local elapsed = (sched.now() - t0) / 1000
    local finished = stats.done + stats.skipped + stats.failed
    local rate = human_rate(stats.done + stats.failed, elapsed)
    local eta = rate > 0 and (stats.total - finished) / rate or nil
    local now = sched.now()
    local p = { done = finished, total = stats.total, rate = rate, eta = eta, retries = stats.retries,
      failed = stats.failed, elapsed = elapsed, final = final,
      paused = pause_until > now and (pause_until - now) / 1000 or nil }      -- (a 429's pause, s)
    if type(o.progress) == "function" then return o.progress(p) end
  end

  -- 4. One row.
  -- the preflight has found the asset: the row's journal records name it from now on (a resume reads it back)
  local function before_replace(dev)
    local row = row_of[coroutine.running() or false]
    if row and not row.assetId then row.assetId = dev.assetId end
  end
  local wf_opts = assert(workflow.options {
    sleep = function(s) return sched:sleep(s) end, require_secret = require_secret,
    verify = o.verify, check_free = o.check_free, max_attempts = o.max_attempts, settle_ms = o.settle_ms,
    read_attempts = o.read_attempts, backoff_ms = o.backoff_ms, backoff_max_ms = o.backoff_max_ms,
    max_retry_after = o.max_retry_after,
    steps = false,              -- the batch keeps its own records: no per-row step list
    prove_key = false,          -- proven once for the batch (M.prove_key), not on every row's preflight
    before_replace = before_replace,
  })
  -- a row whose device the bulk read found (not a gateway) is verified in bulk too, after its replace
  local wf_bulk = o.verify and assert(workflow.options {
    sleep = function(sec) return sched:sleep(sec) end, require_secret = require_secret,
    verify = false, check_free = o.check_free, max_attempts = o.max_attempts, settle_ms = o.settle_ms,
    read_attempts = o.read_attempts, backoff_ms = o.backoff_ms, backoff_max_ms = o.backoff_max_ms,
    max_retry_after = o.max_retry_after, steps = false, prove_key = false, before_replace = before_replace,
  }) or wf_opts
  -- A row's last record. The row counts (count(), into the stats) once the record is durable;
  -- its task ends now, so the slot goes to the next row instead of waiting on the disk.
  -- The queue, in journal order: the record's sequence number, and what to count (an outcome, or an error).
  local q_seq, q_what, first_durable, last_durable = {}, {}, 1, 0
  local function finish_row(row, rec, what)
    rec.key, rec.line = row.key, row.line
    last_durable = last_durable + 1
    q_seq[last_durable], q_what[last_durable] = journal:append(rec), what
  end
  local function count(what)
    if type(what) == "string" then          -- done: "replaced" or "reconciled"
      stats.done = stats.done + 1
      if what == "reconciled" then stats.reconciled = stats.reconciled + 1 else stats.replaced = stats.replaced + 1 end
    else                                    -- failed (or unknown): the error
      stats.failed = stats.failed + 1
      local k = what and what.kind or "unknown"
      stats.failed_by_kind[k] = (stats.failed_by_kind[k] or 0) + 1
    end
  end
  local function counted(upto)        -- applies the counts of rows whose record is now durable
    while first_durable <= last_durable and q_seq[first_durable] <= upto do
      count(q_what[first_durable])
      q_seq[first_durable], q_what[first_durable] = nil, nil
      first_durable = first_durable + 1
    end
  end

  local cred_only = false     -- credentials written whose secret is in no journal record
  local function deliver(row, new, outcome)
    if not cred or present[new.deviceKey] then return end
    local enc = new.encrypted or {}
    local rec = {}
    for k, v in pairs(row.extra or {}) do rec[k] = v end
    rec.line, rec.assetId, rec.productKey, rec.deviceKey = row.line, new.assetId, new.productKey, new.deviceKey
    rec.deviceSecret, rec.outcome = new.deviceSecret, outcome
    if not new.deviceSecret then rec.encryptedSecret, rec.sessionKey = enc.deviceSecret, enc.sessionKey end
    cred:add(rec)
    -- a secret the journal does not hold (encrypted) must be on disk before the journal says done
    if rec.deviceSecret and not new.encrypted then cred_only = true end
  end

  local function result(row, outcome, assetId, e)
    local t = row.target
    local rec = {}
    for k, v in pairs(row.extra or {}) do rec[k] = v end
    rec.line, rec.target = row.line, t.assetId or (t.productKey .. "/" .. t.deviceKey)
    rec.newDeviceKey, rec.assetId, rec.outcome = t.newDeviceKey, assetId, outcome
    rec.error_kind, rec.error_code, rec.message = e and e.kind, e and e.code, e and e.message
    results:add(rec)
  end

  -- Reads back a device whose replace may have happened (in flight when the
  -- process died): done → the new credentials; not done → nil (safe to run); false: unreadable.
  local function read_back(row, prev)
    -- The request may still be on its way or being handled: wait until it
    -- must have ended (its timeout) plus the settle time before trusting a read.
    -- ("unknown" was written after the request had ended: only the settle time is left.)
    local in_flight = prev.state == "sending" and (prev.timeout or client.timeout) * 1000 or 0
    local ready_at = (prev.ts or 0) + in_flight + (o.settle_ms or 2000)
    local wait = ready_at - core.now_ms()
    if wait > 0 then sched:sleep(wait / 1000) end
    return M._read_row(client, row.target, prev, require_secret, o.read_attempts,
      function(a) sched:sleep(backoff_cap(a) / 1000) end)
  end

  local to_verify
  local replaced_at = nil            -- when the last replace returned (the rest of the run is its verification)
  local function run_row(row)
    local prev = journal.state.by_key[row.key]
    if prev and prev.state == "done" and reverify then
      -- trust only what the platform shows: done there (new key, secret in hand) or run the row again
      local d = M._read_row(client, row.target, prev, require_secret, o.read_attempts,
        function(a) sched:sleep(backoff_cap(a) / 1000) end)
      if d then
        deliver(row, { assetId = d.assetId, productKey = d.productKey, deviceKey = d.deviceKey,
          deviceSecret = d.deviceSecret, encrypted = d.encrypted }, "done")
        stats.skipped, stats.reverified = stats.skipped + 1, stats.reverified + 1
        return
      elseif d == false then
        local e = errors.new("transport", "could not read the device back to check the journal's done record; " ..
          "resume again")
        result(row, "unknown", prev.assetId, e)
        count(e)
        return
      end
      prev = nil                            -- not done on the platform, whatever the journal said
    end
    if prev and prev.state == "done" then
      if cred and not present[row.target.newDeviceKey] and prev.assetId then
        -- the journal has it but the credentials file does not: recover from the journal
        local new = { assetId = prev.assetId, productKey = prev.productKey, deviceKey = prev.newDeviceKey,
          encrypted = prev.encrypted }
        if prev.encrypted and client:has_private_key() then
          new.deviceSecret = client:decrypt_secret(prev.encrypted)
        end
        deliver(row, new, "done")
      end
      stats.skipped = stats.skipped + 1
      return
    end
    if prev and (prev.state == "sending" or prev.state == "unknown") then
      local d = read_back(row, prev)
      if d then
        local new = { assetId = d.assetId, productKey = d.productKey, deviceKey = d.deviceKey,
          deviceSecret = d.deviceSecret, encrypted = d.encrypted }
        deliver(row, new, "reconciled")
        result(row, "reconciled", d.assetId)
        finish_row(row, { state = "done", outcome = "reconciled", assetId = d.assetId, productKey = d.productKey,
          newDeviceKey = d.deviceKey, encrypted = d.encrypted }, "reconciled")
        return
      elseif d == false then
        local e = errors.new("transport", "could not read the device back to reconcile; resume again")
        result(row, "unknown", prev.assetId, e)
        count(e)
        return
      end
    end
    sending(row, client.timeout)
    local dev = row.device
    local in_bulk = dev and dev.productType ~= "Gateway" and o.verify
    local report, err = workflow.replace(client, row.target, in_bulk and wf_bulk or wf_opts, dev and { device = dev })
    replaced_at = sched.now()
    if not report and err and err.report and err.report.new then report = err.report end
    if report and report.outcome == "wrong_device" then
      -- the platform replaced another asset than the row's (its key moved meanwhile): not done; that asset's
      -- new credentials are kept (credentials file, journal) so its secret is not lost
      deliver(row, report.new, "wrong_device")
      result(row, "wrong_device", report.new.assetId, err)
      finish_row(row, { state = "failed", assetId = row.assetId, wrong_device = report.new.assetId,
        productKey = report.new.productKey, newDeviceKey = report.new.deviceKey, encrypted = report.new.encrypted,
        error = err_fields(err) }, err)
      return
    end
    if report and report.new and (report.secret_missing or
        not workflow.secret_in_hand(client, require_secret, report.new)) then
      -- replaced, but the new secret is not in hand: not done (never counted, never skipped by a resume)
      -- until a resume reads it back; the encrypted pair, if any, is kept in the journal meanwhile
      local e = report.error and report.error.secret_missing and report.error or
        errors.new("decrypt", "replaced, but the new secret is not in hand; resume to read it back")
      e = errors.new(e.kind, tostring(e.message) .. "; resume to read it back", { secret_missing = true })
      result(row, "unknown", report.new.assetId, e)
      finish_row(row, { state = "unknown", assetId = report.new.assetId, productKey = report.new.productKey,
        newDeviceKey = report.new.deviceKey, encrypted = report.new.encrypted, error = err_fields(e) }, e)
      return
    end
    if report and report.new and in_bulk and report.ok then
      -- done once verified: with the next window of replaced rows, in one read (finish_verified)
      to_verify(row, report)
    elseif report and report.new then
      local new = report.new
      deliver(row, new, report.outcome)
      local warn = report.error
      result(row, report.outcome, new.assetId, warn)
      finish_row(row, { state = "done", outcome = report.outcome, assetId = new.assetId, productKey = new.productKey,
        newDeviceKey = new.deviceKey, encrypted = new.encrypted,
        warning = warn and err_fields(warn) or nil }, report.outcome)
    else
      local unknown = err and err.report and err.report.outcome == "unknown"
      result(row, unknown and "unknown" or "failed", row.assetId, err)
      finish_row(row, { state = unknown and "unknown" or "failed", assetId = row.assetId, error = err_fields(err) },
        err or false)
    end
  end

  -- The verification in bulk. A replaced row waits here until settle_ms after its reply (EnOS: a write shows
  -- in reads after ~2 s), then a window of them is read back in one Search Device and judged as the
  -- workflow's verify step judges (workflow.check_replaced); a row the search disagrees with or misses is read
  -- alone with Get Device before anything is concluded. The row is done then, with a warning if the read-back
  -- still disagrees (the replace happened and the secret is in hand, as with the workflow's verify).
  local vq, vfirst, vlast = {}, 1, 0
  local workers_left = 0
  function to_verify(row, report)
    vlast = vlast + 1
    vq[vlast] = { row = row, report = report, at = sched.now() }
    sched:signal("verify")
  end
  local function finish_verified(row, report, problems, notes)
    local new = report.new
    local warn = workflow.verify_error(problems)
    if warn then report.ok = false report.error = warn end
    if #notes > 0 and not warn then report.notes = notes end
    deliver(row, new, report.outcome)
    result(row, report.outcome, new.assetId, warn)
    finish_row(row, { state = "done", outcome = report.outcome, assetId = new.assetId, productKey = new.productKey,
      newDeviceKey = new.deviceKey, encrypted = new.encrypted,
      warning = warn and err_fields(warn) or nil }, report.outcome)
  end
  local settle = o.settle_ms or 2000
  local function verify_window(now)
    local batch = {}
    while vfirst <= vlast and #batch < o.read_batch and vq[vfirst].at + settle <= now do
      batch[#batch + 1] = vq[vfirst]
      vq[vfirst] = nil
      vfirst = vfirst + 1
    end
    local targets = {}
    for k, v in ipairs(batch) do targets[k] = { assetId = v.report.new.assetId, orgId = v.row.target.orgId } end
    local res = bulk.read(client, targets, { window = o.read_batch, sleep = function(sec) sched:sleep(sec) end,
      read_attempts = o.read_attempts, max_retry_after = o.max_retry_after })
    for k, v in ipairs(batch) do
      local want = { assetId = v.report.new.assetId, newDeviceKey = v.row.target.newDeviceKey,
        productKey = v.report.old and v.report.old.productKey }
      local problems, notes = {}, {}
      local d = res[k] and res[k].device
      if d then workflow.check_replaced(d, want, problems, notes)
      else problems[1] = "cannot read the device back: " .. tostring(res[k] and res[k].err) end
      if #problems > 0 and d then
        -- the search may lag: one Get Device for this row before concluding
        local one = bulk.read(client, { targets[k] }, { window = 1, read_attempts = o.read_attempts,
          sleep = function(sec) sched:sleep(sec) end, max_retry_after = o.max_retry_after, search = false })
        problems, notes = {}, {}
        d = one[1] and one[1].device
        if d then workflow.check_replaced(d, want, problems, notes)
        else problems[1] = "cannot read the device back: " .. tostring(one[1] and one[1].err) end
      end
      if d then v.report.new.status = d.status end
      finish_verified(v.row, v.report, problems, notes)
    end
  end
  local function verifier()
    while true do
      if vfirst > vlast then
        if workers_left == 0 then return end
        sched:wait_signal("verify")
      else
        -- a window goes when read_batch rows have settled, when the oldest has waited twice the settle time,
        -- or, once no row is left to replace, when the last one has settled (fewer, fuller reads)
        local now, n, W = sched.now(), vlast - vfirst + 1, o.read_batch
        local full_at = n >= W and vq[vfirst + W - 1].at + settle or math.huge
        local last_at = workers_left == 0 and vq[vlast].at + settle or math.huge
        local go_at = math.min(full_at, last_at, vq[vfirst].at + 2 * settle)
        if go_at > now then
          -- (in steps: the last worker's end moves go_at earlier, and a sleep is not woken by a signal)
          sched:sleep(math.max(math.min(go_at - now, 100), 1) / 1000)
        else
          verify_window(now)
        end
      end
    end
  end

  -- Group commit. Each turn writes what rows produced (credentials first, then the journal), and
  -- when no fsync is under way hands the files to the worker thread (in that order), so the disk
  -- never stalls the event loop. Rows waiting for "journal" go on once their record is synced.
  -- The credentials file is fsynced with the group only when it holds a secret the journal does
  -- not (V2.1's plain secrets): a done row whose credentials line a power loss took is otherwise
  -- recovered on resume from the journal's encrypted pair. It is always fsynced at the end.
  -- At most one fsync starts per commit_ms, so groups are larger than one fsync's worth of rows
  -- (fsyncs cost CPU as well as time); commit() returns how long until the next may start.
  local syncing, sync_err, last_sync = false, nil, -math.huge
  local function wrote(what, ok, err)      -- a full disk stops the batch naming the file (the journal stays whole)
    if not ok then
      error(("cannot write the %s: %s; free the space, then resume"):format(what,
        (tostring(err):gsub("^write failed: ", ""))), 0)
    end
  end
  local function commit()
    if cred then wrote("credentials file " .. o.out, cred:flush()) end
    wrote("results file " .. rpath, results:flush())    -- a report: written as rows finish, fsynced at the end
    wrote("journal " .. jpath, journal:write())
    if journal.written <= journal.synced or syncing then return end
    local now = sched.now()
    if now - last_sync < o.commit_ms then return (last_sync + o.commit_ms - now) / 1000 end
    last_sync = now
    local sync_cred = cred and cred_only
    cred_only = false
    syncing = true
    local upto, left = journal.written, sync_cred and 2 or 1
    local function done(ok, err)
      if not ok then sync_err = err or "fsync failed" end
      left = left - 1
      if left > 0 then return end
      syncing = false
      journal.synced = upto
      journal.fsyncs = journal.fsyncs + 1
      counted(upto)
      sched:signal("journal")
    end
    if sync_cred then sched:fsync(cred.f, done) end
    sched:fsync(journal.f, done)
  end

  sched.before_wait = commit

  -- 5. The loop: `concurrency` tasks, each running rows one after another as the plan streams in
  -- (a task per worker, not per row: no coroutine and stack to build and collect for every row),
  -- and the group commit between the scheduler's turns.
  t0 = sched.now()
  local rows, close_plan = plan_rows(plan, src.format or o.plan_format)
  local exhausted = false
  local function plan_row()
    while true do
      local row = rows()
      if row == nil then return nil end
      if row then
        local t = workflow.checked_target(assert(plan_mod.check_row(row.fields)))
        return { line = row.line, target = t, key = plan_mod.target_key(t), assetId = t.assetId, extra = row.extra }
      end
    end
  end
  -- The reader: a window of plan rows at a time, the devices of the rows to replace read in one Search
  -- Device (the preflight then checks what it found instead of reading each device); a queue of read rows
  -- kept ahead of the workers. Rows the journal knows (a resume) are not read here: their own path reads them.
  local ready, rfirst, rlast = {}, 1, 0
  local ahead = math.max(o.concurrency, o.read_batch)
  local function reader()
    while not exhausted do
      if rlast - rfirst + 1 >= ahead then sched:wait_signal("need_rows")
      else
        local win, fresh, targets, eof = {}, {}, {}, false
        while #win < o.read_batch do
          local row = plan_row()
          if not row then eof = true break end
          win[#win + 1] = row
          if not journal.state.by_key[row.key] then
            fresh[#fresh + 1] = row
            targets[#targets + 1] = row.target
          end
        end
        if #targets > 0 then
          local res = bulk.read(client, targets, { window = o.read_batch, search_only = true,
            sleep = function(sec) sched:sleep(sec) end, read_attempts = o.read_attempts,
            max_retry_after = o.max_retry_after })
          for k, row in ipairs(fresh) do
            local d = res[k] and res[k].device
            if d then row.device, row.assetId = d, d.assetId end
          end
        end
        for _, row in ipairs(win) do rlast = rlast + 1 ready[rlast] = row end
        exhausted = eof             -- (only now: a worker that finds the queue empty and the plan read ends)
        sched:signal("rows")
      end
    end
    sched:signal("rows")
  end
  local function next_row()
    while true do
      if rfirst <= rlast then
        local row = ready[rfirst]
        ready[rfirst] = nil
        rfirst = rfirst + 1
        sched:signal("need_rows")
        return row
      end
      if exhausted then return nil end
      sched:wait_signal("rows")
    end
  end
  local function worker()             -- (row_of: the row a task's requests belong to, for the transport)
    local co = coroutine.running()
    for row in next_row do
      row_of[co] = row
      run_row(row)
    end
    row_of[co] = nil
    workers_left = workers_left - 1
    sched:signal("verify")
  end
  local last_progress = 0
  local ok, run_err = pcall(function()
    sched:spawn(reader)
    workers_left = o.concurrency
    for _ = 1, o.concurrency do sched:spawn(worker) end
    sched:spawn(verifier)
    while sched:count() > 0 do
      sched:step(0.05)
      commit()
      if sync_err then error("fsync failed: " .. tostring(sync_err.message or sync_err), 0) end
      if #sched.errors > 0 then error(sched.errors[1], 0) end
      local now = sched.now()
      if now - last_progress >= 200 then last_progress = now progress(false) end
    end
  end)
  close_plan()
  if cred then cred:close() end
  results:close()
  journal:close()
  if ok then counted(journal.synced) end
  restore_transport()
  sched:close()           -- its multi (and worker thread) belong to this batch either way
  if not ok then
    return nil, errors.new("transport", "batch stopped: " .. tostring(run_err))
  end
  stats.elapsed = (sched.now() - t0) / 1000
  stats.replacing = replaced_at and (replaced_at - t0) / 1000 or stats.elapsed
  stats.key_proof = proof
  if stats.retry_after_cut then
    warnings[#warnings + 1] = ("the gateway asked to wait %s s (Retry-After); the batch waited %s s at most " ..
      "(max_retry_after)"):format(stats.retry_after_cut, o.max_retry_after)
  end
  stats.warnings = warnings
  stats.rate = human_rate(stats.done + stats.failed, stats.elapsed)
  stats.journal, stats.results, stats.credentials = jpath, rpath, o.out
  stats.fsyncs = journal.fsyncs
  progress(true)
  return stats
end

return M
