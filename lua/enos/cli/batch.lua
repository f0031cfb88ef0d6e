--- enos-replace batch: fleet-scale replacement from a CSV or JSON Lines plan.
-- @module enos.cli.batch
local batch = require "enos.batch"
local core = require "enos.core"
local out = require "enos.cli.output"
local preflight = require "enos.preflight"
local errors = require "enos.errors"

local M = {}

local PROG_NAME = "enos-replace"

M.EXIT_TEXT = [[
Exit codes (batch):
   0  every row is done (now or in an earlier run resumed here); --dry-run: every row would pass
   2  usage, or the plan has errors (listed with their line numbers; nothing was sent)
   3  configuration or authentication
   4  some rows failed for good (see the results file); the others are done; --dry-run: some rows would fail
   5  the batch stopped (network, files); run it again with --resume]]

--- Adds the `batch` command to the parser.
function M.add_command(p, h)
  local b = p:command("batch", "Replace many devices from a plan (CSV or JSON Lines), concurrently and resumably.")
  h.help_flag(b, "batch")
  b:argument("plan", "The plan: CSV with a header (assetId or productKey,deviceKey, then newDeviceKey; other "
    .. "columns are carried through) or JSON Lines (.jsonl); - reads it from stdin (then --journal is needed)."):args("?")
  b:group("Batch",
    b:option("--concurrency", "Rows in flight at once (default 8)."):argname("<n>"),
    b:option("--qps", "At most this many requests per second (default: no cap)."):argname("<r>"),
    b:option("--out", "Credentials file (0600; .csv or .jsonl), written as rows complete. Required unless "
      .. "--no-secret; the new secrets are decrypted with the private key, which is required too."):argname("<file>"),
    b:option("--journal", "Journal file (default PLAN.journal): makes the batch resumable."):argname("<file>"),
    b:option("--results", "Results file (default: the journal's name with .journal replaced by .results.csv): "
      .. "every row's outcome."):argname("<file>"),
    b:flag("--resume", "Continue the batch of --journal: skip done rows, reconcile rows that were in flight."),
    b:flag("--reverify", "With --resume: read every row the journal says is done back from the platform and "
      .. "trust only what it shows (for a plan that changed since the journal began, or a journal in doubt)."),
    b:flag("--check", "Only check the plan (every row, duplicates); send nothing."),
    b:flag("--dry-run", "Check the plan, then look every row up on the platform in bulk (about two calls per "
      .. "100 rows) and list the rows that would fail; change nothing."),
    b:option("--read-batch", "Rows read in one bulk call (Search Device) by the preflight, the verification and "
      .. "--dry-run (1-200, default 100)."):argname("<n>"),
    b:option("--max-retry-after", "The longest Retry-After (s) the batch honours when throttled (default 300)."):argname("<s>"),
    b:option("--wait-active", "After the batch, watch its replaced devices (as `enos-replace watch` does) until "
      .. "they are online, at most this many seconds; exit 7 if some are not."):argname("<s>"),
    b:flag("--no-secret", "Do not request the new deviceSecrets."),
    b:flag("-y --yes", "Do not ask for confirmation."),
    b:flag("--json", "Print the summary as one JSON document on stdout.")
  )
  b:group("After each replace",
    b:flag("--subdevices", "Ask each device's gateway (Get Gateway: one more call per device), restore a link the "
      .. "replace dropped, name the gateway in the credentials and write one file per gateway of its sub-devices' "
      .. "new triples."),
    b:flag("--check-certificates", "List each row's certificates (one more call per device): a row with valid ones "
      .. "and no csr is refused. Rows with a csr column value always are."),
    b:option("--cert-days", "Validity in days of the certificates issued for the plan's csr column (default 730)."):argname("<n>"),
    b:option("--tag", "Stamp each replaced asset with a tag (repeatable): NAME=VALUE. One more call per device."):argname("<k=v>")
      :count("*"),
    b:flag("--stamp", "Also tag replacedAt (UTC) and replacedFrom (the old key).")
  )
  h.connection_options(b)
  b:epilog([[
Examples:
   # check a plan: every error with its line number; nothing is sent
   enos-replace batch plan.csv --check

   # before the maintenance window: which rows would fail on the platform (read-only)
   enos-replace batch plan.csv --dry-run

   # run it: 16 rows at a time, at most 50 requests/s, secrets to a 0600 file
   enos-replace batch plan.csv --concurrency 16 --qps 50 --out creds.csv --yes

   # the process died (or was killed): continue exactly where it stopped
   enos-replace batch plan.csv --out creds.csv --resume --yes

   # the plan from another program (give the journal a name; resume by piping the same plan again)
   make-plan | enos-replace batch - --journal fleet.journal --out creds.csv --yes

Plan (CSV):
   productKey,deviceKey,newDeviceKey,site
   pk_inverter,INV-2231-A,INV-2231-B,North

Certificate products: a plan column csr names each new unit's certificate signing request (a path, relative
to the plan's directory). After the replace, the asset's valid certificates are revoked (superseded) and one
is issued for the CSR, into CREDS.cert-NEWKEY.pem beside the credentials file.

The journal holds the encrypted secrets only; the credentials file holds the decrypted ones. Without a
private key a batch refuses to start (the new secrets could not be read) unless --no-secret.
]] .. "\n" .. M.EXIT_TEXT)
  return b
end

local function fmt_eta(s)
  if not s then return "?" end
  if s >= 3600 then return string.format("%dh%02dm", math.floor(s / 3600), math.floor(s % 3600 / 60)) end
  if s >= 60 then return string.format("%dm%02ds", math.floor(s / 60), math.floor(s % 60)) end
  return string.format("%ds", math.floor(s))
end

local run_plan

--- batch --dry-run: the bulk preflight over a checked plan; lists the rows that would fail. Exit 0 when every
-- row would pass, 4 when some would not.
function M.dry_run(c, args, h, plan_path, plan_name)
  local EXIT = h.EXIT
  if args.resume or args.reverify then h.say(c, "--dry-run changes nothing: it does not go with --resume") return EXIT.usage end
  local window = args.read_batch           -- (checked by run_plan)
  local client, code = h.make_client(c, args)
  if not client then return code end
  local r, err = preflight.run(client, plan_path, { window = window, max_retry_after = args.max_retry_after })
  client:close()
  if not r then
    return h.report_error(c, args, err, err.kind == "invalid_argument" and EXIT.usage or
      ((err.kind == "config" or err.kind == "auth") and EXIT.config or EXIT.network))
  end
  for _, p in ipairs(r.problems) do c.err(("%s:%d: %s\n"):format(plan_name, p.line, errors.clean(p.message))) end
  if r.problem_count > #r.problems then c.err(("… and %d more\n"):format(r.problem_count - #r.problems)) end
  for _, n in ipairs(r.notes) do c.err(("%s:%d: note: %s\n"):format(plan_name, n.line, errors.clean(n.message))) end
  c.err(("%d of %d row(s) would pass, %d would fail; %d call(s) to the platform, nothing was changed\n"):format(
    r.ok, r.rows, r.rows - r.ok, r.calls))
  if args.json then
    c.out(out.json({ ok = r.ok == r.rows, rows = r.rows, pass = r.ok, problem_count = r.problem_count,
      problems = r.problems, notes = r.notes, calls = r.calls }, true) .. "\n")
  end
  return r.ok == r.rows and EXIT.ok or EXIT.refused
end

--- Runs the batch command; returns the exit code.
function M.run(c, args, h)
  local EXIT = h.EXIT
  if not args.plan then h.say(c, "a plan file is required: enos-replace batch PLAN") return EXIT.usage end
  if args.reverify and not args.resume then h.say(c, "--reverify goes with --resume") return EXIT.usage end
  if args.wait_active ~= nil and not (tonumber(args.wait_active) and tonumber(args.wait_active) >= 0) then
    h.say(c, "--wait-active must be a number of seconds >= 0")
    return EXIT.usage
  end
  if args.wait_active ~= nil and (args.check or args.dry_run) then
    h.say(c, "--wait-active goes with a run, not with --check or --dry-run")
    return EXIT.usage
  end
  if args.cert_days ~= nil then
    local n = tonumber(args.cert_days)
    if not n or n < 1 or n % 1 ~= 0 then h.say(c, "--cert-days must be a whole number >= 1") return EXIT.usage end
    args.cert_days = n
  end
  for _, t in ipairs(args.tag or {}) do
    local k, v = t:match("^([^=]*)=(.*)$")
    local why = not k and ("--tag " .. t .. ": expected NAME=VALUE") or require("enos.aftercare").tag_problem(k, v)
    if why then h.say(c, "--tag: %s", why) return EXIT.usage end
    args.tags = args.tags or {}
    if args.tags[k] then h.say(c, "--tag: %s is given twice", k) return EXIT.usage end
    args.tags[k] = v
  end
  if args.plan ~= "-" then return run_plan(c, args, h, args.plan, args.plan) end
  -- The plan on stdin: read whole into a private temporary file (it is read twice: checked, then run).
  if not args.check and not args.journal then
    h.say(c, "a plan read from stdin (-) needs --journal FILE (it has no name to derive one from)")
    return EXIT.usage
  end
  if not args.check and not args.yes then
    h.say(c, "a plan read from stdin (-) leaves no way to ask for confirmation: add --yes")
    return EXIT.usage
  end
  local tmp = os.tmpname()                       -- created 0600 by mkstemp
  local f, err = io.open(tmp, "wb")
  if not f then os.remove(tmp) h.say(c, "cannot spool the plan from stdin: %s", tostring(err)) return EXIT.usage end
  for chunk in c.read_chunk do
    local ok, werr = f:write(chunk)
    if not ok then
      f:close() os.remove(tmp)
      h.say(c, "cannot spool the plan from stdin: %s", tostring(werr))
      return EXIT.usage
    end
  end
  f:close()
  local ok, code = pcall(run_plan, c, args, h, tmp, "stdin")
  os.remove(tmp)
  if not ok then error(code, 0) end
  return code
end

-- The command on a plan file at plan_path (named plan_name in messages).
function run_plan(c, args, h, plan_path, plan_name)
  local EXIT = h.EXIT
  local whole = { concurrency = 1024, read_batch = 200 }
  for _, name in ipairs { "concurrency", "qps", "max_retry_after", "read_batch" } do
    if args[name] ~= nil then
      local n, max = tonumber(args[name]), whole[name]
      if not n or n <= 0 or n ~= n or n == math.huge or (max and (n % 1 ~= 0 or n > max)) then
        h.say(c, "--%s must be a %s", name:gsub("_", "-"), max and ("whole number 1-" .. max) or "positive number")
        return EXIT.usage
      end
      args[name] = n
    end
  end

  local chk, cerr = batch.check(plan_path)
  if not chk then h.say(c, "%s", tostring(cerr)) return EXIT.usage end
  if chk.error_count > 0 then
    for _, e in ipairs(chk.errors) do c.err(string.format("%s:%d: %s\n", plan_name, e.line, e.message)) end
    if chk.error_count > #chk.errors then
      c.err(string.format("… and %d more\n", chk.error_count - #chk.errors))
    end
    h.say(c, "the plan has %d error(s); nothing was sent", chk.error_count)
    if args.json then c.out(out.json({ ok = false, rows = chk.rows, errors = chk.errors }, true) .. "\n") end
    return EXIT.usage
  end
  -- the plan's csr column: every CSR file read and checked too (relative to the plan's directory; stdin: the
  -- current directory)
  args.csr_dir = plan_name == "stdin" and "." or (plan_path:match("^(.*)/[^/]*$") or ".")
  for _, col in ipairs(chk.extra_columns or {}) do
    if col == "csr" then
      local bad = batch.check_csrs(plan_path, { name = plan_path }, { csr_dir = args.csr_dir })
      if bad then
        for _, p in ipairs(bad.problems) do c.err(string.format("%s:%d: %s\n", plan_name, p.line, p.message)) end
        if bad.count > #bad.problems then c.err(string.format("… and %d more\n", bad.count - #bad.problems)) end
        h.say(c, "the plan's csr column names %d unusable CSR(s); nothing was sent", bad.count)
        return EXIT.usage
      end
    end
  end
  if args.check then
    c.err(string.format("%s: %d row(s), no errors\n", plan_name, chk.rows))
    if args.json then c.out(out.json({ ok = true, rows = chk.rows }, true) .. "\n") end
    return EXIT.ok
  end
  if args.dry_run then return M.dry_run(c, args, h, plan_path, plan_name) end

  -- output files, before anything is created or sent (batch.run would refuse them later, after the journal)
  do
    -- (stat, never open: opening a FIFO to look would block)
    local function exists(path) return core.stat(path, true) ~= nil end
    local function dir_ok(path)
      local dir = path:match("^(.*)/[^/]*$") or "."
      if dir == "" then dir = "/" end
      local st = core.stat(dir)
      return st ~= nil and st.type == "directory" and core.access(dir, "w") == true
    end
    local journal = args.journal or (plan_path .. ".journal")
    local results = args.results or (journal:gsub("%.journal$", "") .. ".results.csv")
    if args.resume and not exists(journal) then
      -- (a typo in --journal would otherwise start the batch anew: every done row then fails "not found")
      h.say(c, "--resume: no journal at %s (check --journal; without --resume a new batch starts)", journal)
      return EXIT.usage
    end
    for _, f in ipairs { { "--out", args.out }, { "--journal", journal }, { "--results", results } } do
      local flag, path = f[1], f[2]
      if path then
        local e = exists(path)
        if path == "" or path:sub(-1) == "/" then
          h.say(c, "%s must be a file path", flag) return EXIT.usage
        elseif (e == true or e == 0) and not args.resume then
          h.say(c, "%s %s already exists: choose another file, or --resume the batch that wrote it", flag, path)
          return EXIT.usage
        elseif not dir_ok(path) then
          h.say(c, "%s %s: its directory does not exist or is not writable", flag, path)
          return EXIT.usage
        end
      end
    end
  end

  local client, _ = h.make_client(c, args)
  if not client then return _ end
  -- "done" means the new secret is in hand: on V2.4 that takes the application's private key. Without one, a
  -- batch would replace every device and keep no secret, so it refuses unless told to (--no-secret).
  if not args.no_secret and client.api_version ~= "v2.1" and not client:has_private_key() then
    client:close()
    h.say(c, "no private key is configured (--private-key-file or ENOS_PRIVATE_KEY_FILE): the new secrets could "
      .. "not be read, and every device would be replaced without one. Configure the key, or add --no-secret to "
      .. "replace without the secrets (the new units then need dynamic activation)")
    return EXIT.usage
  end
  local require_secret = not args.no_secret and client.api_version ~= "v2.1" and client:has_private_key()
  if (require_secret or client.api_version == "v2.1") and not args.out then
    h.say(c, "the new secrets need a place: give --out FILE (or --no-secret)")
    return EXIT.usage
  end
  if not args.yes then
    if not c.isatty then
      h.say(c, "refusing to change devices without confirmation: stdin is not a terminal. Add --yes.")
      return EXIT.usage
    end
    c.err(string.format("About to replace %d device(s) from %s at %s (org %s)%s.\nProceed? [y/N] ",
      chk.rows, plan_name, client.endpoint, tostring(client.org_id),
      args.resume and ", resuming" or ""))
    local answer = c.readline()
    if not (answer and answer:lower():match("^%s*y[es]*%s*$")) then
      c.err("Not confirmed; nothing changed.\n")
      return EXIT.aborted
    end
  end

  -- a live line (carriage return, erase) only on a terminal that understands it; else a plain line every 5 s
  local term = c.getenv("TERM")
  local tty_err = c.stderr_tty and term ~= "dumb" and (c.getenv("NO_COLOR") or "") == ""
  local last_line = 0
  local function progress(p)
    local line = string.format("%d/%d finished  %.1f/s  ETA %s  retries %d  failed %d", p.done, p.total, p.rate,
      fmt_eta(p.eta), p.retries, p.failed)
    -- (the gateway throttles: say that the batch waits, and how long, rather than look stuck)
    if p.paused and p.paused >= 1 then line = line .. string.format("  throttled: waiting %d s", math.ceil(p.paused)) end
    if tty_err then
      c.err("\r\27[K" .. line .. (p.final and "\n" or ""))
    else
      local now = core.monotonic_ms()
      if p.final or now - last_line >= 5000 then last_line = now c.err(line .. "\n") end
    end
  end

  -- an interrupt from here on: the journal is consistent at any point, --resume continues
  local again = { PROG_NAME, "batch" }
  for _, a in ipairs(c.argv) do
    if a ~= "batch" and a ~= "--resume" then
      again[#again + 1] = a:find("[^%w%._/:=@,+%-]") and ("'" .. a:gsub("'", "'\\''") .. "'") or a
    end
  end
  again[#again + 1] = "--resume"
  c.pending = { batch = table.concat(again, " ") }
  local s, err = batch.run(client, plan_path, {
    concurrency = args.concurrency, qps = args.qps, out = args.out, journal = args.journal,
    results = args.results, resume = args.resume, require_secret = require_secret and true or false,
    progress = progress, reverify = args.reverify or nil, max_retry_after = args.max_retry_after,
    read_batch = args.read_batch, tags = args.tags, stamp = args.stamp or nil, subdevices = args.subdevices or nil,
    check_certificates = args.check_certificates or nil, cert_valid_day = args.cert_days, csr_dir = args.csr_dir,
    on_resume = function(r)
      if r.reverify then
        h.say(c, "resuming: %d of %d rows are done in the journal; --reverify reads them back first", r.done, r.total)
      else
        h.say(c, "resuming: %d of %d rows remain", r.remaining, r.total)
      end
    end,
  })
  client:close()
  if not s and tostring(err.message):find("interrupted!", 1, true) then
    h.say(c, "interrupted. The journal is consistent: continue with the same command and --resume:\n  %s",
      c.pending.batch)
    return EXIT.network
  end
  c.pending = nil
  if not s then
    local code = err.kind == "invalid_argument" and EXIT.usage or
      ((err.kind == "config" or err.kind == "auth") and EXIT.config or
      (err.kind == "permission" and EXIT.refused or EXIT.network))
    return h.report_error(c, args, err, code)
  end
  for _, w in ipairs(s.warnings or {}) do h.say(c, "warning: %s", w) end
  if (s.reverified or 0) > 0 then h.say(c, "%d done row(s) read back and confirmed on the platform", s.reverified) end
  local kinds = {}
  for k, n in pairs(s.failed_by_kind) do kinds[#kinds + 1] = k .. " " .. n end
  table.sort(kinds)
  c.err(string.format("%d row(s): %d done (%d replaced, %d reconciled), %d already done, %d failed%s in %.1f s "
    .. "(%.1f rows/s)\nresults: %s\n%s", s.total, s.done, s.replaced, s.reconciled, s.skipped, s.failed,
    #kinds > 0 and (" [" .. table.concat(kinds, ", ") .. "]") or "", s.elapsed, s.rate, s.results,
    s.credentials and ("credentials: " .. s.credentials .. "\n") or ""))
  if s.gateway_files and #s.gateway_files > 0 then
    c.err(("per-gateway files (0600, one per gateway to configure): %d, e.g. %s\n"):format(#s.gateway_files,
      s.gateway_files[1]))
  end
  if args.json then
    c.out(out.json({ ok = s.failed == 0, total = s.total, done = s.done, replaced = s.replaced,
      reconciled = s.reconciled, skipped = s.skipped, failed = s.failed, failed_by_kind = s.failed_by_kind,
      retries = s.retries, elapsed = s.elapsed, rate = s.rate, results = s.results, journal = s.journal,
      credentials = s.credentials, gateway_files = s.gateway_files and out.array(s.gateway_files) }, true) .. "\n")
  end
  local code = s.failed == 0 and EXIT.ok or EXIT.refused
  if args.wait_active and (s.done + s.skipped) > 0 then
    -- the same watch as `enos-replace watch RESULTS`: the rows replaced now or in an earlier run resumed here
    local wcode = require("enos.cli.watch").run(c, { file = s.journal, wait = args.wait_active,
      interval = math.min(10, math.max(1, tonumber(args.wait_active) / 10)), json = false,
      endpoint = args.endpoint, access_key = args.access_key, secret_key = args.secret_key, org_id = args.org_id,
      private_key_file = args.private_key_file, ca_file = args.ca_file, api_version = args.api_version,
      timeout = args.timeout, profile = args.profile }, h)
    if code == EXIT.ok then code = wcode end
  end
  return code
end

return M
