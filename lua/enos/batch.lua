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
local outputs_mod = require "enos.batch.outputs"
local gate_mod = require "enos.batch.gate"
local reader_mod = require "enos.batch.reader"
local verifier_mod = require "enos.batch.verifier"
local commit_mod = require "enos.batch.commit"
local progress_mod = require "enos.batch.progress"
local aftercare = require "enos.aftercare"

local M = {}

--- Options and their types (anything else is refused, so a typo is not silently ignored).
M.OPTIONS = {
  concurrency = "number", qps = "number", retry_attempts = "number", backoff_ms = "number",
  backoff_max_ms = "number", verify = "boolean", check_free = "boolean", max_attempts = "number", read_attempts = "number",
  progress_interval = "number", settle_ms = "number", out = "string", format = "string", journal = "string",
  results = "string", commit_ms = "number", resume = "boolean", require_secret = "boolean", progress = "any",
  plan_format = "string", reverify = "boolean", max_retry_after = "number", read_batch = "number",
  on_resume = "function", tags = "table", stamp = "boolean", subdevices = "boolean", check_certificates = "boolean",
  cert_valid_day = "number", csr_dir = "string",
}

--- Default options of `run` (each may be given in `opts`).
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

-- ---------------------------------------------------------------- helpers

-- The workflow's steps after the replace: one of them failing leaves the row "replaced", not done.
local AFTER_STEPS = { link = true, certificate = true, tag = true }

local function err_fields(e)
  if not e then return nil end
  return { kind = e.kind, code = e.code, status = e.status, message = e.message, request_id = e.request_id }
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

--- Whether a journal's header names the platform, organization and application this client is configured
-- for (a resume against another environment would skip rows done elsewhere and write another platform's
-- secrets as done). Returns nil (the same, or a journal too old to say) | err.
-- @tparam table header the journal's first record
-- @param client the batch's client
-- @tparam string jpath the journal's path (named in the message)
function M.check_identity(header, client, jpath)
  header = header or {}
  local function app(ak) return ak and (tostring(ak):sub(1, 4) .. "…") or "?" end
  local diffs = {}
  if header.endpoint and header.endpoint ~= client.endpoint then
    diffs[#diffs + 1] = ("endpoint %s, now %s"):format(header.endpoint, tostring(client.endpoint))
  end
  if header.orgId and header.orgId ~= client.org_id then
    diffs[#diffs + 1] = ("org %s, now %s"):format(header.orgId, tostring(client.org_id))
  end
  if header.appKey and header.appKey ~= client.access_key then
    diffs[#diffs + 1] = ("application %s, now %s"):format(app(header.appKey), app(client.access_key))
  end
  if #diffs == 0 then return nil end
  return errors.new("config", ("journal %s was written against another platform or application (%s): resume " ..
    "it with the settings that started it (--profile, ENOS_*), or start this batch with another --journal")
    :format(jpath, table.concat(diffs, "; ")), { field = "journal" })
end

--- Checks, before anything is sent, that a journal being resumed belongs to this plan: the plan's fingerprint
-- must be the header's, and every done record's new key (and asset, where the plan names one) must be its plan
-- row's. With reverify, a difference is no error: the done rows are read back from the platform instead
-- (state.reverify). Returns nil | an error naming the journal line and the plan line.
function M.check_resume(state, plan, src, o, jpath)
  local h = state.header or {}
  if h.plan_sha256 and src.fp and (h.plan_sha256 ~= src.fp.sha256 or h.plan_size ~= src.fp.size) then
    if not o.reverify then
      return errors.new("invalid_argument", ("the plan %s is not the one journal %s was started with (%d bytes then, " ..
        "%d now): resume with the original plan, or add --reverify to read every done row back from the " ..
        "platform and trust only what it shows"):format(src.name, tostring(jpath), tonumber(h.plan_size) or -1, src.fp.size),
        { field = "plan" })
    end
    state.reverify = true
    return nil
  end
  local rows, close = plan_rows(plan, src.format or o.plan_format)
  local bad
  local already = 0
  for row in rows do
    if row then
      local t = plan_mod.check_row(row.fields)
      local prev = t and state.by_key[plan_mod.target_key(t)]
      if prev and prev.state == "done" then already = already + 1 end
      if prev and (prev.state == "done" or prev.state == "replaced") and (prev.newDeviceKey ~= t.newDeviceKey or
          (t.assetId and prev.assetId and prev.assetId ~= t.assetId)) then
        bad = ("journal line %d says plan line %d is done with newDeviceKey %s, but the plan's line %d asks for %s")
          :format(prev.jline or 0, tonumber(prev.line) or 0, plan_mod.excerpt(prev.newDeviceKey), row.line,
            t.newDeviceKey)
        break
      end
    end
  end
  close()
  state.already = already
  if bad and not o.reverify then
    return errors.new("invalid_argument", bad .. ": this journal does not belong to this plan (or was altered); " ..
      "add --reverify to read the done rows back from the platform and trust only what it shows", { field = "journal" })
  end
  if bad then state.reverify = true end
  return nil
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
-- commit_ms, on_resume (function({total, remaining, done, reverify}), called once before a resume starts).
-- Sleep-free: the scheduler does the waiting.
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
  for k, v in pairs(o.tags or {}) do
    local why = aftercare.tag_problem(k, v)
    if why then return nil, errors.arg("tags", why) end
  end
  if o.cert_valid_day ~= nil and (o.cert_valid_day < 1 or o.cert_valid_day % 1 ~= 0) then
    return nil, errors.arg("cert_valid_day", "cert_valid_day must be a whole number of days >= 1")
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

--- The CSR file a plan row names in its `csr` column, or nil: relative to `csr_dir` (default: the plan's
-- directory).
function M.csr_path(row_extra, src, csr_dir)
  local v = row_extra and row_extra.csr
  if type(v) ~= "string" or v == "" then return nil end
  if v:sub(1, 1) == "/" then return v end
  local dir = csr_dir or (src.name and src.name:match("^(.*)/[^/]*$"))
  return dir and (dir .. "/" .. v) or v
end

--- A row's CSR text, checked: pem | nil, message (naming the file). See enos.aftercare.read_csr.
function M.read_csr(path)
  return aftercare.read_csr(path)
end

--- Checks every CSR a plan's `csr` column names: nil | an invalid_argument error naming the first bad line
-- (err.problems: every one, {line, message}, at most 100).
function M.check_csrs(plan, src, o)
  local rows, close = plan_rows(plan, src.format or o.plan_format)
  local problems, count = {}, 0
  for row in rows do
    if row then
      local path = M.csr_path(row.extra, src, o.csr_dir)
      if path then
        local pem, why = M.read_csr(path)
        if not pem then
          count = count + 1
          if #problems < 100 then problems[#problems + 1] = { line = row.line, message = why } end
        end
      end
    end
  end
  close()
  if count > 0 then
    return errors.new("invalid_argument", ("the plan's csr column names %d unusable CSR(s); nothing was sent. " ..
      "line %d: %s"):format(count, problems[1].line, problems[1].message), { field = "csr", problems = problems,
      count = count })
  end
end

-- The run, once the options and the files are checked. plan: the snapshot's path or an iterator factory.
-- The stages: the plan check (M.checked), the journal (enos.journal), the outputs (enos.batch.outputs), the
-- gate every request goes through (enos.batch.gate), the reader of windows (enos.batch.reader), the workers
-- (run_row, below), the verifier (enos.batch.verifier), the group commit (enos.batch.commit), progress
-- (enos.batch.progress).
function M._run_checked(client, plan, o, src, jpath, rpath)
  -- 1. Check the whole plan before the first request.
  local chk, cerr = M.checked(plan, { format = src.format or o.plan_format })
  if not chk then return nil, cerr end
  local has_csr = false
  for _, c in ipairs(chk.extra_columns or {}) do if c == "csr" then has_csr = true end end
  if has_csr then
    -- every row's CSR read and checked now: a missing or unusable one is found before any request
    local cerr2 = M.check_csrs(plan, src, o)
    if cerr2 then return nil, cerr2 end
    if not o.out and not o.resume then
      return nil, errors.arg("out", "the plan has a csr column: the issued certificates need a credentials file (out)")
    end
  end

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
  -- The token first: a refused key (auth, config) fails every row alike, so it stops the batch here, before
  -- anything is created. (A retryable failure is left to the rows: they retry it.)
  -- (A resume checks its journal first: a journal refused sends nothing at all.)
  local function refused_key()
    local authed, aerr = client:authenticate()
    if not authed and (aerr.kind == "auth" or aerr.kind == "config" or aerr.kind == "permission") then
      return aerr
    end
  end
  if not o.resume then
    local aerr = refused_key()
    if aerr then return nil, aerr end
    if prove() then return nil, perr end
  end
  local require_secret = o.require_secret
  if require_secret == nil then require_secret = client.api_version ~= "v2.1" and client:has_private_key() end
  if client.api_version == "v2.1" then require_secret = false end

  -- The journal's lock first: from here on no other run touches this batch's files (a second run on the same
  -- journal is refused while this one lives).
  local lock, lerr = journal_mod.lock(jpath, { resume = o.resume })
  if not lock then return nil, errors.new("config", lerr) end
  local present = {}          -- new keys already in the credentials file (filled on resume only)
  local cred_format = outputs_mod.format_of(o.out, o.format)
  local warnings = {}
  if o.resume then
    local notes, rerr = outputs_mod.repair { { o.out, "credentials file" }, { rpath, "results file" } }
    if not notes then lock.f:close() return nil, errors.new("config", rerr) end
    for _, n in ipairs(notes) do warnings[#warnings + 1] = n end
    if o.out then present = outputs_mod.keys_in(o.out, cred_format) end
  end
  local journal, jstate = journal_mod.open(jpath, { resume = o.resume, lock = lock,
    keep_encrypted = function(rec) return o.out ~= nil and not present[rec.newDeviceKey] end })
  if not journal then return nil, errors.new("config", tostring(jstate)) end
  if jstate.repaired then warnings[#warnings + 1] = jstate.repaired end
  if not o.resume or journal.state.records == 0 then
    if o.resume then
      local bad = refused_key() or (prove() and perr)
      if bad then journal:close() return nil, bad end
    end
    journal:append { t = "batch", plan = src.name, rows = chk.rows, version = core._VERSION,
      plan_size = src.fp and src.fp.size, plan_sha256 = src.fp and src.fp.sha256,
      endpoint = client.endpoint, orgId = client.org_id, appKey = client.access_key }
  else
    -- 2b. A resume trusts its journal only for the platform, organization and application it was written
    -- against, and for the plan it was written for, row by row.
    local bad = M.check_identity(journal.state.header, client, jpath) or M.check_resume(journal.state, plan, src, o, jpath)
      or refused_key() or (prove() and perr)
    if bad then
      journal:close()
      return nil, bad
    end
    if not (journal.state.header and journal.state.header.plan_sha256) and src.fp then
      warnings[#warnings + 1] = "journal " .. jpath .. " was written by an older enos (no plan fingerprint): " ..
        "its done rows were checked against the plan one by one"
    end
  end
  local outs, oerr = outputs_mod.open { out = o.out, format = cred_format, results = rpath,
    extra_columns = chk.extra_columns, resume = o.resume, present = present, gateways = o.subdevices,
    certificates = has_csr }
  if not outs then journal:close() return nil, errors.new("config", oerr) end
  local by_key = journal.state.by_key
  local reverify = o.reverify or journal.state.reverify

  -- 3. The scheduler, and the gate every request of every row goes through.
  local topts, given = client:transport_options()
  local own = given == nil
  local sched = scheduler.new(own and {
    timeout = topts.timeout, connect_timeout = topts.connect_timeout,
    cafile = topts.cafile, capath = topts.capath,
    verify_tls = topts.verify_tls, user_agent = topts.user_agent,
    max_body = topts.max_body, max_connections = o.concurrency * 2,
  } or { multi = core.multi {} })
  -- rows the journal already holds as done: a resume's progress and ETA count only the others (a --reverify
  -- reads every one of them back, so there it counts them all)
  local already = (o.resume and not reverify) and (journal.state.already or 0) or 0
  local stats = { total = chk.rows, done = 0, replaced = 0, reconciled = 0, skipped = 0, reverified = 0, failed = 0,
    failed_by_kind = {}, retries = 0, requests = 0, already = already }
  if o.resume and type(o.on_resume) == "function" then
    o.on_resume { total = chk.rows, remaining = chk.rows - already, done = journal.state.already or 0,
      reverify = reverify and true or false }
  end
  local settle = o.settle_ms or 2000

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
  local commit = commit_mod.new(sched, journal, outs, { commit_ms = o.commit_ms, on_durable = count })

  local row_of = {}            -- coroutine → the row its requests belong to
  local function row_here() return row_of[coroutine.running() or false] end

  -- The "sending" record: durable before a replace leaves, so that a crash from then on is reconciled
  -- on resume (read back after ts + timeout + settle). A row writes it when it starts, so its fsync
  -- overlaps the preflight; a replace sent later than half the settle time after it writes a fresh one.
  -- A record that ages past that slack while its fsync is awaited is written afresh, once (a fresh record
  -- whose fsync alone takes longer: the disk's own pace, nothing would be quicker).
  local function sending(row, timeout)
    local rec = { key = row.key, line = row.line, state = "sending", assetId = row.assetId,
      newDeviceKey = row.target.newDeviceKey, timeout = timeout, gateway = row.gateway }
    row.sending_seq = journal:append(rec)
    row.sending_ts = rec.ts                  -- the time a resume will count from
  end
  local sending_slack = settle / 2
  local function before_send(req)
    local row = row_here()
    if not (row and req.call == "replace_device") then return end
    for _ = 1, 2 do
      local fresh = not row.sending_seq or core.now_ms() - row.sending_ts > sending_slack
      if fresh then sending(row, req.timeout) end
      if journal:durable(row.sending_seq) then break end      -- (durable already: no wait, no aging)
      commit:wait(row.sending_seq)
      if fresh or core.now_ms() - row.sending_ts <= sending_slack then break end
    end
  end
  local gate = gate_mod.new(sched, own and sched.transport or given, { qps = o.qps, retry_attempts = o.retry_attempts,
    backoff_ms = o.backoff_ms, backoff_max_ms = o.backoff_max_ms, max_retry_after = o.max_retry_after,
    before_send = before_send })
  local restore_transport = client:use_transport(gate.transport)
  local function pause(attempt) sched:sleep(gate:backoff_cap(attempt) / 1000) end

  local t0 = sched.now()
  local function progress(final)
    if type(o.progress) ~= "function" then return end
    stats.retries = gate.retries
    return o.progress(progress_mod.snapshot(stats, (sched.now() - t0) / 1000, gate:paused(), final))
  end

  -- 4. One row: the workflow, with the batch's options. The preflight has found the asset: the row's journal
  -- records name it from now on (a resume reads it back).
  local function before_replace(dev, report)
    local row = row_here()
    if row and not row.assetId then row.assetId = dev.assetId end
    if row and report and report.gateway and not row.gateway then
      -- a sub-device: the gateway goes into the sending record, so a resume can restore a link the replace dropped
      row.gateway = { assetId = report.gateway.assetId, productKey = report.gateway.productKey,
        deviceKey = report.gateway.deviceKey }
      row.sending_seq = nil
    end
  end
  local has_tags = (o.tags and next(o.tags) ~= nil) or o.stamp
  -- a row with steps after its replace: its secret is journaled ("replaced") before they run, so a crash
  -- among them resumes with what is left (workflow finish), never with a second replace
  local function on_replaced(report)
    local row = row_here()
    if not (row and (has_tags or row.csr or report.gateway)) then return end
    local n = report.new
    row.after = true
    journal:append { key = row.key, line = row.line, state = "replaced", assetId = n.assetId,
      productKey = n.productKey, newDeviceKey = n.deviceKey, encrypted = n.encrypted, gateway = row.gateway }
  end
  local function wf_options(verify, finish)
    return assert(workflow.options {
      sleep = function(sec) return sched:sleep(sec) end, require_secret = require_secret,
      verify = verify, check_free = o.check_free, max_attempts = o.max_attempts, settle_ms = o.settle_ms,
      read_attempts = o.read_attempts, backoff_ms = o.backoff_ms, backoff_max_ms = o.backoff_max_ms,
      max_retry_after = o.max_retry_after,
      steps = false,              -- the batch keeps its own records: no per-row step list
      prove_key = false,          -- proven once for the batch (M.prove_key), not on every row's preflight
      before_replace = before_replace, on_replaced = on_replaced,
      check_gateway = o.subdevices or false, check_certificates = o.check_certificates or false,
      tags = o.tags, stamp = o.stamp, cert_valid_day = o.cert_valid_day, finish = finish or nil,
    })
  end
  local wf_opts = wf_options(o.verify)
  -- a row whose device the bulk read found (not a gateway) is verified in bulk too, after its replace
  local wf_bulk = o.verify and wf_options(false) or wf_opts
  local wf_finish = wf_options(o.verify, true)

  local function finish_done(row, new, outcome, warn)
    outs:deliver(row, new, outcome)
    outs:result(row, outcome, new.assetId, warn)
    commit:finish(row, { state = "done", outcome = outcome, assetId = new.assetId, productKey = new.productKey,
      newDeviceKey = new.deviceKey, encrypted = new.encrypted, warning = warn and err_fields(warn) or nil,
      gateway = new.gateway and { assetId = new.gateway.assetId, productKey = new.gateway.productKey,
        deviceKey = new.gateway.deviceKey } or nil,
      certSn = new.certificate and new.certificate.certSn or nil }, outcome)
  end
  -- A row replaced before (journal "replaced", or reconciled) whose steps after the replace are left: the
  -- workflow's finish (no second replace; the secret read back; link, certificate, tags done if not yet).
  local function finish_after(row, prev, outcome)
    local t = workflow.checked_target { assetId = prev.assetId, newDeviceKey = prev.newDeviceKey,
      orgId = row.target.orgId }
    local report, err = workflow.replace(client, t, wf_finish, { csr = row.csr, gateway = prev.gateway,
      old_key = row.target.deviceKey, replaced_ms = prev.ts })
    if not report and err and err.report and err.report.new then report = err.report end
    if report and report.new and workflow.secret_in_hand(client, require_secret, report.new) then
      return finish_done(row, report.new, outcome, report.error)
    end
    local e = err or (report and report.error) or errors.new("unknown", "the replace's remaining steps did not finish")
    outs:result(row, "unknown", prev.assetId, e)
    return commit:finish(row, { state = "replaced", assetId = prev.assetId, productKey = prev.productKey,
      newDeviceKey = prev.newDeviceKey, encrypted = prev.encrypted, gateway = prev.gateway, error = err_fields(e) }, e)
  end
  local function unreadable(row, prev, what)
    local e = errors.new("transport", "could not read the device back to " .. what .. "; resume again")
    outs:result(row, "unknown", prev.assetId, e)
    count(e)
  end

  local verifier = verifier_mod.new(sched, client, { read_batch = o.read_batch, settle_ms = settle,
    read_attempts = o.read_attempts, max_retry_after = o.max_retry_after,
    on_verified = function(row, report, problems, notes)
      local warn = workflow.verify_error(problems)
      if warn then report.ok = false report.error = warn end
      if #notes > 0 and not warn then report.notes = notes end
      finish_done(row, report.new, report.outcome, warn)
    end })

  local replaced_at = nil            -- when the last replace returned (the rest of the run is its verification)
  local function run_row(row)
    local prev = by_key[row.key]
    local cpath = has_csr and M.csr_path(row.extra, src, o.csr_dir)
    if cpath then
      local pem, why = M.read_csr(cpath)
      if not pem then
        -- (checked before the run; changed since): this row fails before anything is sent for it
        local e = errors.new("invalid_argument", why .. "; nothing was sent for this row", { field = "csr" })
        outs:result(row, "failed", row.assetId, e)
        return commit:finish(row, { state = "failed", assetId = row.assetId, error = err_fields(e) }, e)
      end
      row.csr = pem
    end
    if prev and prev.state == "replaced" then            -- (reverify or not: the finish reads the device back)
      return finish_after(row, prev, "done")
    end
    local back = row.back            -- (the reader's read-back of a row the journal left in flight, or reverified)
    if prev and prev.state == "done" and reverify then
      -- trust only what the platform shows: done there (new key, secret in hand) or run the row again
      if back.state == "done" then
        local d = back.device
        outs:deliver(row, { assetId = d.assetId, productKey = d.productKey, deviceKey = d.deviceKey,
          deviceSecret = d.deviceSecret, encrypted = d.encrypted }, "done")
        stats.skipped, stats.reverified = stats.skipped + 1, stats.reverified + 1
        return
      elseif back.state == "unclear" then
        return unreadable(row, prev, "check the journal's done record")
      end
      prev = nil                            -- not done on the platform, whatever the journal said
    end
    if prev and prev.state == "done" then
      if not outs:delivered(row.target.newDeviceKey) and prev.assetId then
        -- the journal has it but the credentials file does not: recover from the journal
        local new = { assetId = prev.assetId, productKey = prev.productKey, deviceKey = prev.newDeviceKey,
          encrypted = prev.encrypted }
        if prev.encrypted and client:has_private_key() then
          new.deviceSecret = client:decrypt_secret(prev.encrypted)
        end
        outs:deliver(row, new, "done")
      end
      stats.skipped = stats.skipped + 1
      return
    end
    if prev and (prev.state == "sending" or prev.state == "unknown") then
      if back.state == "done" then
        local d = back.device
        if has_tags or row.csr or prev.gateway or o.subdevices then
          return finish_after(row, { assetId = d.assetId, productKey = d.productKey, newDeviceKey = d.deviceKey,
            encrypted = d.encrypted, gateway = prev.gateway, ts = prev.ts }, "reconciled")
        end
        local new = { assetId = d.assetId, productKey = d.productKey, deviceKey = d.deviceKey,
          deviceSecret = d.deviceSecret, encrypted = d.encrypted }
        return finish_done(row, new, "reconciled")
      elseif back.state == "unclear" then
        return unreadable(row, prev, "reconcile")
      end
    end
    sending(row, client.timeout)
    local dev = row.device
    local in_bulk = dev and dev.productType ~= "Gateway" and o.verify
    local report, err = workflow.replace(client, row.target, in_bulk and wf_bulk or wf_opts,
      (dev or row.csr) and { device = dev, csr = row.csr } or nil)
    replaced_at = sched.now()
    if not report and err and err.report and err.report.new then report = err.report end
    if report and report.outcome == "wrong_device" then
      -- the platform replaced another asset than the row's (its key moved meanwhile): not done; that asset's
      -- new credentials are kept (credentials file, journal) so its secret is not lost
      outs:deliver(row, report.new, "wrong_device")
      outs:result(row, "wrong_device", report.new.assetId, err)
      return commit:finish(row, { state = "failed", assetId = row.assetId, wrong_device = report.new.assetId,
        productKey = report.new.productKey, newDeviceKey = report.new.deviceKey, encrypted = report.new.encrypted,
        error = err_fields(err) }, err)
    end
    if report and report.new and (report.secret_missing or
        not workflow.secret_in_hand(client, require_secret, report.new)) then
      -- replaced, but the new secret is not in hand: not done (never counted, never skipped by a resume)
      -- until a resume reads it back; the encrypted pair, if any, is kept in the journal meanwhile
      local e = report.error and report.error.secret_missing and report.error or
        errors.new("decrypt", "replaced, but the new secret is not in hand; resume to read it back")
      e = errors.new(e.kind, tostring(e.message) .. "; resume to read it back", { secret_missing = true })
      outs:result(row, "unknown", report.new.assetId, e)
      return commit:finish(row, { state = "unknown", assetId = report.new.assetId, productKey = report.new.productKey,
        newDeviceKey = report.new.deviceKey, encrypted = report.new.encrypted, error = err_fields(e) }, e)
    end
    local after_err = report and report.new and report.error and AFTER_STEPS[report.error.step] and report.error
    if after_err then
      -- replaced, secret in hand, but a step after it failed: not done. The credentials are delivered now (the
      -- secret is never left to chance); the journal says "replaced", so a resume finishes what is left.
      local e = errors.new(after_err.kind, "replaced, but the " .. after_err.step .. " step failed: " ..
        tostring(after_err.message) .. "; resume to finish it", { code = after_err.code })
      outs:deliver(row, report.new, "replaced")
      outs:result(row, "failed", report.new.assetId, e)
      return commit:finish(row, { state = "replaced", assetId = report.new.assetId, productKey = report.new.productKey,
        newDeviceKey = report.new.deviceKey, encrypted = report.new.encrypted, gateway = row.gateway,
        error = err_fields(e) }, e)
    end
    if report and report.new and in_bulk and report.ok then
      verifier:add(row, report)       -- done once verified, with the next window of replaced rows, in one read
    elseif report and report.new then
      finish_done(row, report.new, report.outcome, report.error)
    else
      local unknown = err and err.report and err.report.outcome == "unknown"
      outs:result(row, unknown and "unknown" or "failed", row.assetId, err)
      commit:finish(row, { state = unknown and "unknown" or "failed", assetId = row.assetId,
        error = err_fields(err) }, err or false)
    end
  end

  -- 5. The loop: the reader, `concurrency` workers (a task per worker, not per row: no coroutine and stack to
  -- build and collect for every row), the verifier, and the group commit between the scheduler's turns.
  local rows, close_plan = plan_rows(plan, src.format or o.plan_format)
  local reader = reader_mod.new(sched, client, rows, { read_batch = o.read_batch,
    ahead = math.max(o.concurrency, o.read_batch), read_attempts = o.read_attempts,
    max_retry_after = o.max_retry_after, settle_ms = settle, timeout = client.timeout,
    require_secret = require_secret, reverify = reverify, by_key = by_key, pause = pause })
  local function worker()
    local co = coroutine.running()
    while true do          -- (not a for-in: plain Lua 5.1 cannot yield inside a for-in's iterator)
      local row = reader:next()
      if not row then break end
      row_of[co] = row
      run_row(row)
    end
    row_of[co] = nil
    verifier:done()
  end
  sched.before_wait = function() return commit:turn() end
  local last_progress = 0
  local ok, run_err = pcall(function()
    sched:spawn(function() reader:run() end)
    verifier:expect(o.concurrency)
    for _ = 1, o.concurrency do sched:spawn(worker) end
    sched:spawn(function() verifier:run() end)
    while sched:count() > 0 do
      sched:step(0.05)
      commit:turn()
      local ferr = commit:failed()
      if ferr then error("fsync failed: " .. tostring(ferr.message or ferr), 0) end
      if #sched.errors > 0 then error(sched.errors[1], 0) end
      local now = sched.now()
      if now - last_progress >= 200 then last_progress = now progress(false) end
    end
  end)
  close_plan()
  outs:close()
  journal:close()
  if ok then commit:counted(journal.synced) end
  restore_transport()
  sched:close()           -- its multi (and worker thread) belong to this batch either way
  if not ok then
    return nil, errors.new("transport", "batch stopped: " .. tostring(run_err))
  end
  stats.elapsed = (sched.now() - t0) / 1000
  stats.replacing = replaced_at and (replaced_at - t0) / 1000 or stats.elapsed
  stats.key_proof = proof
  stats.requests, stats.retries = gate.requests, gate.retries
  if gate.retry_after_cut then
    warnings[#warnings + 1] = ("the gateway asked to wait %s s (Retry-After); the batch waited %s s at most " ..
      "(max_retry_after)"):format(gate.retry_after_cut, o.max_retry_after)
  end
  stats.warnings = warnings
  stats.rate = stats.elapsed > 0 and (stats.done + stats.failed) / stats.elapsed or 0
  stats.journal, stats.results, stats.credentials = jpath, rpath, o.out
  stats.fsyncs = journal.fsyncs
  if o.subdevices and o.out then
    local files, gerr = outputs_mod.gateway_files(o.out, cred_format)
    if files then stats.gateway_files = files
    else warnings[#warnings + 1] = "could not write the per-gateway files: " .. tostring(gerr) end
  end
  progress(true)
  return stats
end

return M
