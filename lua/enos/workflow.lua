--- The replacement workflow: the whole job around one Replace Device call.
--
-- preflight → (confirm) → replace, reconciling unknown outcomes → deliver → verify → wait.
-- The new secret is delivered right after the replace (before verification) so that
-- nothing that happens later can lose it.
-- @module enos.workflow
local core = require "enos.core"
local errors = require "enos.errors"
local json = require "enos.json"
local reconcile = require "enos.reconcile"
local aftercare = require "enos.aftercare"
local target_mod = require "enos.target"

-- (enos.plan requires enos.client only, so this does not loop)

local M = {}

--- Default options (all may be overridden in `opts`).
M.DEFAULTS = {
  check_free = true,       -- search that newDeviceKey is free before changing anything
  verify = true,
  max_attempts = 3,        -- replace attempts in all, first one included
  read_attempts = 3,       -- attempts of each idempotent read (get, search)
  backoff_ms = 500,        -- first backoff; doubles per attempt
  backoff_max_ms = 8000,
  settle_ms = 2000,        -- pause after an unknown outcome before trusting a read-back (EnOS: ~2 s)
  verify_attempts = 3,     -- reads before a stale-looking verification counts as failed
  poll_ms = 1000,          -- wait_active: first poll interval, grows x1.5
  poll_max_ms = 10000,
  format = "json",
  steps = true,            -- false: a lean report (no step records, no provisioning record) for many rows
  max_retry_after = 300,   -- seconds: the longest Retry-After honoured (a longer one is cut, with a warning)
  -- preflight reads the current secret and decrypts it: a wrong private key stops before anything changes
  -- (a batch proves the key once itself: false per row)
  prove_key = true,
  check_gateway = true,       -- a sub-device: preflight asks for its gateway, the link is checked after the replace
  check_certificates = true,  -- preflight lists the certificates: valid ones without a `csr` refuse the replace
  cert_valid_day = 730,
}

local KNOWN_OPTS = {
  check_free = true, verify = true, max_attempts = true, read_attempts = true, backoff_ms = true,
  backoff_max_ms = true, settle_ms = true, verify_attempts = true, poll_ms = true, poll_max_ms = true,
  format = true, require_secret = true, dry_run = true, out = true, overwrite = true, wait_active = true,
  sleep = true, clock = true, confirm = true, on_step = true, record = true, steps = true, prove_key = true,
  before_replace = true,
  max_retry_after = true,
  check_gateway = true, check_certificates = true, csr = true, cert_valid_day = true, cert_authority = true,
  tags = true, stamp = true, finish = true, on_replaced = true, on_cert_issued = true,
}

--- The formats of the provisioning record (`format`): json, env, text.
M.FORMATS = { json = true, env = true, text = true }

-- ---------------------------------------------------------------- small helpers

local function default_sleep(seconds)
  if seconds <= 0 then return end
  -- inside nginx, a blocking sleep would stall the worker: yield to it instead
  local ngx_ok, enos_ngx = pcall(require, "enos.ngx")
  if ngx_ok and enos_ngx.in_nginx() and enos_ngx.check_phase() then return enos_ngx.sleep(seconds) end
  core.sleep(seconds)                   -- (monotonic, no shell)
end
--- The sleep used when `opts.sleep` is not given: inside nginx (in a phase with cosockets) it yields to nginx
-- (enos.ngx.sleep); elsewhere it blocks (core.sleep, monotonic).
-- @function default_sleep
-- @tparam number seconds
M.default_sleep = default_sleep

-- Whether anything is at path (a dangling symlink too), without opening it (a FIFO's open would block).
local function exists(path)
  return core.stat(path, true) ~= nil
end

local function copy_fields(src, names)
  local out = {}
  for _, k in ipairs(names) do out[k] = src[k] end
  return out
end

local DEVICE_FIELDS = { "assetId", "productKey", "deviceKey", "status", "productType", "activeTime",
  "lastOnlineTime", "orgId" }

-- (built once: Lua does not fold the concatenation of literals)
local NOT_REQUESTED = "the new deviceSecret is not requested (require_secret = false)"
local NO_PRIVATE_KEY = "no private key configured: the new deviceSecret is not requested; the new hardware will " ..
  "need dynamic activation, or load the application's private key to read it"

local function ident_of(t)
  if t.assetId then return { assetId = t.assetId, orgId = t.orgId } end
  return { productKey = t.productKey, deviceKey = t.deviceKey, orgId = t.orgId }
end

local function describe_target(t)
  if t.assetId then return "assetId " .. t.assetId end
  return "productKey " .. tostring(t.productKey) .. " deviceKey " .. tostring(t.deviceKey)
end

-- ---------------------------------------------------------------- the report

local Report = {}
Report.__index = Report
Report.__name = "enos.workflow.report"

local function fmt_ms(ms)
  if ms == nil then return "?" end
  if ms >= 10000 then return string.format("%.1f s", ms / 1000) end
  return string.format("%d ms", math.floor(ms + 0.5))
end
--- A duration in milliseconds as text: "N ms", "N.N s" from 10 s on, "?" for nil.
-- @function fmt_ms
-- @param ms a number, or nil
M.fmt_ms = fmt_ms

--- A multi-line summary; never shows a secret.
function Report.__tostring(r)
  local lines = {}
  local t = r.target or {}
  lines[#lines + 1] = string.format("enos.workflow.report: %s (%s) %s -> %s", tostring(r.outcome),
    r.ok and "ok" or "not ok", describe_target(t), tostring(t.newDeviceKey))
  if r.old then
    lines[#lines + 1] = string.format("  old: assetId=%s productKey=%s deviceKey=%s status=%s",
      tostring(r.old.assetId), tostring(r.old.productKey), tostring(r.old.deviceKey), tostring(r.old.status))
  end
  if r.new then
    local sec = r.new.deviceSecret and "decrypted" or (r.new.encrypted and "encrypted only" or "none")
    lines[#lines + 1] = string.format("  new: assetId=%s productKey=%s deviceKey=%s secret=%s",
      tostring(r.new.assetId), tostring(r.new.productKey), tostring(r.new.deviceKey), sec)
  end
  for _, s in ipairs(r.steps) do
    lines[#lines + 1] = string.format("  step %-9s %-8s %8s  %s", s.name, s.outcome, fmt_ms(s.ms),
      s.detail and tostring(s.detail) or "")
  end
  for _, w in ipairs(r.warnings) do lines[#lines + 1] = "  warning: " .. w end
  if r.error then lines[#lines + 1] = "  error: " .. tostring(r.error) end
  return table.concat(lines, "\n")
end

--- The provisioning record of a report (includes the secret): a table, or nil when nothing was replaced.
function Report:record()
  return self._record
end

-- ---------------------------------------------------------------- context

local Ctx = {}
Ctx.__index = Ctx

--- The workflow's clock (ms).
-- @local
function Ctx:now() return self.clock() end

local NO_STEP = {}

--- Starts a step record (a shared empty one when steps are off).
-- @local
function Ctx:begin(name)
  if not self.o.steps then return NO_STEP end
  return { name = name, t0 = self:now() }
end

--- Ends a step: records it in the report and calls on_step. detail is a string, or a format and its arguments
-- (formatted only when steps are recorded).
-- @local
function Ctx:finish(s, outcome, detail, ...)
  if s == NO_STEP then return nil end
  if select("#", ...) > 0 then detail = string.format(detail, ...) end
  local step = { name = s.name, outcome = outcome, ms = self:now() - s.t0, detail = detail }
  local steps = self.report.steps
  steps[#steps + 1] = step
  if self.on_step then self.on_step(step, self.report) end
  return step
end

--- Adds a warning to the report.
-- @local
function Ctx:warn(msg)
  local w = self.report.warnings
  w[#w + 1] = msg
end

--- Sleeps `ms` milliseconds with the workflow's sleep, counting them in report.slept_ms.
-- @local
function Ctx:sleep_ms(ms)
  if ms <= 0 then return end
  self.report.slept_ms = (self.report.slept_ms or 0) + ms
  self.sleep(ms / 1000)
end

--- Exponential backoff with jitter; honours Retry-After up to max_retry_after (warning when it cuts one).
-- @local
function Ctx:backoff(attempt, err)
  local ms = math.min(self.o.backoff_max_ms, self.o.backoff_ms * 2 ^ (attempt - 1))
  ms = ms * (0.75 + 0.5 * math.random())
  if err and type(err.retry_after) == "number" then
    -- honoured up to max_retry_after: a gateway's `Retry-After: 86400` must not sleep a day in silence
    local cap = self.o.max_retry_after * 1000
    if err.retry_after * 1000 > cap then
      self:warn(("the gateway asked to wait %s s (Retry-After); waited %s s (max_retry_after)"):format(
        err.retry_after, self.o.max_retry_after))
    end
    ms = math.max(ms, math.min(err.retry_after * 1000, cap))
  end
  self:sleep_ms(math.floor(ms))
end

--- Retries an idempotent read, fn(...), on retryable (or garbled-reply) errors, up to read_attempts.
-- @local
function Ctx:read(fn, ...)
  local attempt = 0
  while true do
    attempt = attempt + 1
    local r, e1, e2 = fn(...)
    if r then return r, e1, e2 end
    local err = e1
    if not (errors.is(err) and (err.retryable or err.kind == "protocol")) or attempt >= self.o.read_attempts then
      return nil, err
    end
    self:backoff(attempt, err)
  end
end

--- Ends the workflow with an error carrying the report: nil, err.
-- @local
function Ctx:fail(err, step, outcome)
  local r = self.report
  r.ok = false
  r.outcome = outcome or r.outcome or "refused"
  err.step = err.step or step
  err.report = r
  r.error = err
  r.ms = self:now() - self.t0
  return nil, err
end

-- ---------------------------------------------------------------- options

local function check_opts(opts)
  for k in pairs(opts) do
    if not KNOWN_OPTS[k] then return nil, errors.arg(tostring(k), "unknown workflow option '" .. tostring(k) .. "'") end
  end
  local o = {}
  for k, v in pairs(M.DEFAULTS) do o[k] = v end
  for k, v in pairs(opts) do o[k] = v end
  for _, k in ipairs { "max_attempts", "read_attempts", "verify_attempts" } do
    if type(o[k]) ~= "number" or o[k] < 1 or o[k] % 1 ~= 0 then return nil, errors.arg(k, k .. " must be an integer >= 1") end
  end
  for _, k in ipairs { "backoff_ms", "backoff_max_ms", "settle_ms", "poll_ms", "poll_max_ms", "max_retry_after" } do
    if type(o[k]) ~= "number" or o[k] < 0 then return nil, errors.arg(k, k .. " must be a number >= 0") end
  end
  if o.wait_active ~= nil and (type(o.wait_active) ~= "number" or o.wait_active < 0) then
    return nil, errors.arg("wait_active", "wait_active must be a number of seconds >= 0")
  end
  if not M.FORMATS[o.format] then return nil, errors.arg("format", "format must be json, env or text") end
  if o.out ~= nil and (type(o.out) ~= "string" or o.out == "" or o.out:sub(-1) == "/") then
    return nil, errors.arg("out", "out must be a file path")
  end
  if o.require_secret ~= nil and type(o.require_secret) ~= "boolean" then
    return nil, errors.arg("require_secret", "require_secret must be a boolean")
  end
  for _, k in ipairs { "sleep", "clock", "confirm", "on_step", "before_replace", "on_replaced", "on_cert_issued" } do
    if o[k] ~= nil and type(o[k]) ~= "function" then return nil, errors.arg(k, k .. " must be a function") end
  end
  -- a string "no" is truthy: a flag that is not a boolean would do the opposite of what it says
  for _, k in ipairs { "check_free", "verify", "dry_run", "overwrite", "steps", "prove_key", "check_gateway",
      "check_certificates", "stamp", "finish" } do
    if o[k] ~= nil and type(o[k]) ~= "boolean" then return nil, errors.arg(k, k .. " must be a boolean") end
  end
  if o.csr ~= nil then
    -- checked before anything is sent: a CSR the platform would refuse must not be found out after the replace
    local authority, info = aftercare.check_csr(o.csr)
    if not authority then return nil, errors.arg("csr", "the CSR is not usable: " .. info) end
    if o.cert_authority ~= nil and o.cert_authority ~= authority then
      return nil, errors.arg("cert_authority", "cert_authority " .. tostring(o.cert_authority) .. " does not match " ..
        "the CSR's key (" .. info.key .. ": " .. authority .. ")")
    end
    o.cert_authority, o.csr_info = authority, info
  elseif o.cert_authority ~= nil and o.cert_authority ~= "RSA" and o.cert_authority ~= "ECC" then
    return nil, errors.arg("cert_authority", "cert_authority must be RSA or ECC")
  end
  if type(o.cert_valid_day) ~= "number" or o.cert_valid_day < 1 or o.cert_valid_day % 1 ~= 0 then
    return nil, errors.arg("cert_valid_day", "cert_valid_day must be a whole number of days >= 1")
  end
  if o.tags ~= nil then
    if type(o.tags) ~= "table" then return nil, errors.arg("tags", "tags must be a table of name = value") end
    for k, v in pairs(o.tags) do
      local why = aftercare.tag_problem(k, v)
      if why then return nil, errors.arg("tags", why) end
    end
  end
  if o.record ~= nil then
    -- checked now: a bad record would otherwise fail after the device changed
    if type(o.record) ~= "table" then return nil, errors.arg("record", "record must be a table of extra fields") end
    for k, v in pairs(o.record) do
      if type(k) ~= "string" or M.RECORD_FIELDS[k] then
        return nil, errors.arg("record", "record cannot set '" .. tostring(k) .. "'")
      end
      local t = type(v)
      if t ~= "string" and t ~= "number" and t ~= "boolean" then
        return nil, errors.arg("record", "record field '" .. k .. "' must be a string, a number or a boolean")
      end
    end
  end
  return o
end

-- Options already checked by M.options (a batch checks its rows' options once).
local CHECKED = setmetatable({}, { __mode = "k" })

--- Checks workflow options once for many replace calls: returns opts (to pass to replace) | nil, err.
function M.options(opts)
  local o, err = check_opts(opts or {})
  if not o then return nil, err end
  CHECKED[o] = true
  return o
end

-- Targets already checked (enos.plan.check_row makes the same checks): a batch marks its rows'.
local CHECKED_TARGETS = setmetatable({}, { __mode = "k" })

--- Marks a target as checked by enos.plan.check_row (the batch's rows), so replace does not check it again.
function M.checked_target(t)
  CHECKED_TARGETS[t] = true
  return t
end

local function check_target(target)
  local t, why, field = target_mod.check(target, { unknown = "refuse" })     -- (one rule: enos.target)
  if not t then return nil, errors.arg(field, why) end
  return t
end

-- ---------------------------------------------------------------- delivery

local function iso8601(epoch)
  return os.date("!%Y-%m-%dT%H:%M:%SZ", epoch)
end

local RECORD_ORDER = { "assetId", "productKey", "deviceKey", "deviceSecret", "encrypted", "orgId", "endpoint",
  "apiVersion", "replacedAt", "outcome", "requestId", "gatewayAssetId", "gatewayProductKey", "gatewayDeviceKey",
  "certSn", "certificate", "caCertificate" }
--- The provisioning record's own fields (a set): `opts.record` cannot set them.
M.RECORD_FIELDS = {}
for _, k in ipairs(RECORD_ORDER) do M.RECORD_FIELDS[k] = true end

--- Builds the provisioning record (with the secret) from a replace result.
function M.make_record(client, new, extra)
  local rec = {
    assetId = new.assetId, productKey = new.productKey, deviceKey = new.deviceKey,
    deviceSecret = new.deviceSecret, orgId = new.orgId or client.org_id, endpoint = client.endpoint,
    apiVersion = client.api_version, replacedAt = iso8601(os.time()), requestId = new.requestId,
  }
  if new.encrypted and (new.encrypted.deviceSecret or new.encrypted.sessionKey) then
    rec.encrypted = { deviceSecret = new.encrypted.deviceSecret, sessionKey = new.encrypted.sessionKey }
  end
  if new.gateway then
    rec.gatewayAssetId, rec.gatewayProductKey, rec.gatewayDeviceKey =
      new.gateway.assetId, new.gateway.productKey, new.gateway.deviceKey
  end
  if new.certificate then
    rec.certSn, rec.certificate, rec.caCertificate = new.certificate.certSn, new.certificate.cert,
      new.certificate.caCert
  end
  for k, v in pairs(extra or {}) do rec[k] = v end
  return rec
end

local function env_value(v)
  v = tostring(v)
  if v:match("^[%w%._%-/+=:@]*$") then return v end
  return "'" .. v:gsub("'", "'\\''") .. "'"
end

local ENV_NAMES = {
  { "assetId", "ENOS_ASSET_ID" }, { "productKey", "ENOS_PRODUCT_KEY" }, { "deviceKey", "ENOS_DEVICE_KEY" },
  { "deviceSecret", "ENOS_DEVICE_SECRET" }, { "orgId", "ENOS_ORG_ID" }, { "endpoint", "ENOS_ENDPOINT" },
  { "apiVersion", "ENOS_API_VERSION" }, { "replacedAt", "ENOS_REPLACED_AT" },
  { "gatewayAssetId", "ENOS_GATEWAY_ASSET_ID" }, { "gatewayProductKey", "ENOS_GATEWAY_PRODUCT_KEY" },
  { "gatewayDeviceKey", "ENOS_GATEWAY_DEVICE_KEY" }, { "certSn", "ENOS_CERT_SN" },
  { "certificate", "ENOS_CERTIFICATE" }, { "caCertificate", "ENOS_CA_CERTIFICATE" },
}

--- Renders a record as json | env | text.
function M.render_record(rec, format)
  if format == "env" then
    local out = { "# EnOS device credentials; keep this file private (mode 0600)" }
    for _, p in ipairs(ENV_NAMES) do
      if rec[p[1]] ~= nil then out[#out + 1] = p[2] .. "=" .. env_value(rec[p[1]]) end
    end
    if rec.encrypted then
      out[#out + 1] = "ENOS_DEVICE_SECRET_ENCRYPTED=" .. env_value(rec.encrypted.deviceSecret or "")
      out[#out + 1] = "ENOS_SESSION_KEY_ENCRYPTED=" .. env_value(rec.encrypted.sessionKey or "")
    end
    return table.concat(out, "\n") .. "\n"
  elseif format == "text" then
    local out = {}
    for _, k in ipairs(RECORD_ORDER) do
      local v = rec[k]
      if type(v) == "table" then
        out[#out + 1] = string.format("%-13s %s", k .. ".deviceSecret:", tostring(v.deviceSecret))
        out[#out + 1] = string.format("%-13s %s", k .. ".sessionKey:", tostring(v.sessionKey))
      elseif v ~= nil then
        out[#out + 1] = string.format("%-13s %s", k .. ":", tostring(v))
      end
    end
    return table.concat(out, "\n") .. "\n"
  end
  local parts = {}
  local seen = {}
  local keys = {}
  for _, k in ipairs(RECORD_ORDER) do keys[#keys + 1] = k; seen[k] = true end
  local extra = {}
  for k in pairs(rec) do if not seen[k] then extra[#extra + 1] = k end end
  table.sort(extra)
  for _, k in ipairs(extra) do keys[#keys + 1] = k end
  for _, k in ipairs(keys) do
    local v = rec[k]
    if v ~= nil then
      local ev
      if type(v) == "table" then
        ev = json.encode_object(v, { "deviceSecret", "sessionKey" })
      else
        ev = json.encode(v)
      end
      -- cjson escapes "/"; a "\/" pair in its output is always such an escape
      parts[#parts + 1] = "  " .. json.encode(k) .. ": " .. ev:gsub("\\/", "/")
    end
  end
  return "{\n" .. table.concat(parts, ",\n") .. "\n}\n"
end

local function split_path(path)
  local dir, base = path:match("^(.*)/([^/]+)$")
  if not dir then return ".", path end
  if dir == "" then dir = "/" end
  return dir, base
end

local function tmp_name(path)
  local dir, base = split_path(path)
  local rnd = string.format("%x%x", math.random(0, 0x7fffffff), math.floor(core.monotonic_ms() * 1000) % 0x7fffffff)
  return dir .. "/." .. base .. ".tmp-" .. rnd
end

-- Creates an empty file only readable by its owner, failing when anything is there (O_EXCL, 0600).
-- Returns true | nil, the OS's reason.
local function create_private(path)
  local f, err = core.open_file(path, "excl")
  if not f then return nil, err end
  f:close()
  return true
end

--- Checks that `path` could be written: refuses an existing file unless overwrite, and a directory
-- where we cannot create files. Returns true | nil, err.
function M.check_writable(path, overwrite)
  -- (stat, not open: opening a FIFO blocks until a writer comes; a device is no file to replace)
  local st = core.stat(path)
  if st and st.type ~= "file" then
    return nil, errors.arg("out", "output file " .. path .. " is a " .. st.type .. ", not a regular file")
  end
  if (st or exists(path)) and not overwrite then
    return nil, errors.arg("out", "output file " .. path .. " exists; refusing to overwrite it (use overwrite)")
  end
  local probe = tmp_name(path)
  local ok, oserr = create_private(probe)
  if not ok then
    -- the OS's own reason (a missing directory, permission, a name too long), not a guess
    return nil, errors.arg("out", "cannot create files in " .. split_path(path) .. ": " ..
      tostring(oserr):gsub("^cannot open .*: ", ""))
  end
  os.remove(probe)
  return true
end

--- Writes content to path with mode 0600: a private temp file in the same directory, then a hard
-- link (fails when path exists: O_EXCL semantics) or, with overwrite, a rename. Returns true | nil, err.
function M.write_private(path, content, overwrite)
  local tmp, f, ferr
  for _ = 1, 5 do
    tmp = tmp_name(path)
    f, ferr = core.open_file(tmp, "excl")             -- 0600, never an existing file
    if f then break end
  end
  if not f then
    return nil, errors.arg("out", "cannot create a temporary file next to " .. path .. ": " ..
      tostring(ferr):gsub("^cannot open .*: ", ""))
  end
  local ok, werr = f:write(content)
  if ok then ok, werr = f:sync() end
  f:close()
  if not ok then
    os.remove(tmp)
    return nil, errors.arg("out", "cannot write " .. tmp .. ": " .. tostring(werr))
  end
  if overwrite then
    local rok, rerr = core.rename_durable(tmp, path)
    if not rok then
      os.remove(tmp)
      return nil, errors.arg("out", "cannot rename into " .. path .. ": " .. tostring(rerr))
    end
  else
    -- a hard link publishes the whole file, and fails when path exists (O_EXCL semantics)
    local lok, lerr = core.link_durable(tmp, path)
    os.remove(tmp)
    if not lok then
      return nil, errors.arg("out", (tostring(lerr):find("File exists", 1, true) and
        "output file " .. path .. " exists; not overwritten" or tostring(lerr)))
    end
  end
  return true
end

-- ---------------------------------------------------------------- secrets in hand

--- Whether a replace result (or a device read with requireSecret) holds the new secret as the caller asked
-- for it: a non-empty clear secret on V2.1 or when a private key is loaded; else, when the secret was
-- requested, a complete encrypted pair; nothing when it was not requested.
-- @function secret_in_hand
-- @param client the client (does it decrypt?)
-- @tparam boolean require_secret whether the secret was asked for
-- @tparam table new the replace result or device read
M.secret_in_hand = reconcile.secret_in_hand

--- Why the device read for `target` cannot be replaced as asked (the checks a preflight makes, for one row
-- or a window of them): kind, message, fields | nil.
function M.device_problem(dev, target)
  if dev.status == "disable" then
    return "conflict", "device " .. tostring(dev.assetId) .. " is disabled; enable it before replacing it"
  elseif dev.status == "mirror" then
    return "conflict", "device " .. tostring(dev.assetId) .. " is a mirror device; replace it in its source OU"
  elseif dev.deviceKey == target.newDeviceKey then
    return "invalid_argument", "newDeviceKey " .. target.newDeviceKey .. " equals the current deviceKey of " ..
      "device " .. tostring(dev.assetId) .. " (replaced before? EnOS would answer 11704)", { field = "newDeviceKey" }
  end
end

--- The key proof: `dev` was read with requireSecret by a client with a private key. Returns nil when its
-- current secret decrypted, else a `config` error saying the key does not match the application's.
function M.key_proof_error(dev)
  if type(dev.deviceSecret) == "string" and dev.deviceSecret ~= "" then return nil end
  local why
  if dev.err then why = tostring(dev.err.message or dev.err)
  elseif not dev.encrypted then why = "the platform returned no encrypted secret for it"
  else why = "its secret decrypted to nothing" end
  return errors.new("config", "the private key does not decrypt this application's secrets: reading asset " ..
    tostring(dev.assetId) .. " with requireSecret, " .. why .. ". Check that the private key file is the one " ..
    "of the application's RSA key pair registered on EnOS; nothing was changed", { key_mismatch = true })
end

-- ---------------------------------------------------------------- steps

local function preflight(ctx, client, target, known)
  local s = ctx:begin("preflight")
  local report, o = ctx.report, ctx.o
  if o.out then
    -- before any request: a bad output path is the user's to fix, and nothing need be asked of the platform
    local ok, werr = M.check_writable(o.out, o.overwrite)
    if not ok then
      werr.refused = true
      ctx:finish(s, "refused", werr.message)
      return nil, werr
    end
  end
  local ident = ident_of(target)
  -- The key is proven on the same read (no extra call): the device's current secret must decrypt.
  local prove = o.prove_key and ctx.require_secret and client:has_private_key() and not known
  if prove then ident.requireSecret = true end
  local dev, err
  if known then
    -- read by the caller for this target (the batch reads a window of devices in one Search Device): the
    -- same checks below, no second read
    dev = known
    ctx.reads = { "Search Device (the batch's bulk read)" }
  else
    if o.finish and not target.assetId then
      -- finishing a replace made before: the device carries the new key now (else: not replaced yet)
      local by_new = { productKey = target.productKey, deviceKey = target.newDeviceKey, orgId = ident.orgId,
        requireSecret = ident.requireSecret }
      dev, err = ctx:read(client.get_device, client, by_new)
      if not dev and not (err.kind == "not_found" or err.code == 99400) then
        ctx:finish(s, "failed", tostring(err))
        return nil, err
      end
    end
    if not dev then dev, err = ctx:read(client.get_device, client, ident) end
    ctx.reads = { prove and "Get Device (with requireSecret, to prove the private key)" or "Get Device" }
  end
  if not dev then
    if err.kind == "not_found" or (err.kind == "invalid_argument" and err.code == 99400) then
      err.message = "device not found (" .. describe_target(target) .. "): " .. tostring(err.message)
      err.refused = true
      if not target.assetId and not known then
        -- replaced before? (the same command run again): then the new key names it
        local again = client:get_device { productKey = target.productKey, deviceKey = target.newDeviceKey,
          orgId = target.orgId }
        if again and again.assetId then
          err.message = err.message .. "; but asset " .. tostring(again.assetId) .. " has the new key " ..
            target.newDeviceKey .. " already (replaced before?): to finish what is left of that replace (secret, " ..
            "certificate, gateway link, tags), run it again with --finish (finish = true)"
        end
      end
    end
    ctx:finish(s, "failed", tostring(err))
    return nil, err
  end
  if prove then
    local unproven = not dev.encrypted and not dev.err
    local perr = not unproven and M.key_proof_error(dev)
    dev.deviceSecret, dev.sessionKey, dev.encrypted = nil, nil, nil      -- the old secret is not ours to keep
    if unproven then
      ctx:warn("the private key could not be proven: the platform returned no secret for the device")
    elseif perr then
      perr.refused = true
      ctx:finish(s, "refused", perr.message)
      return nil, perr
    end
  end
  if (target.assetId and dev.assetId ~= target.assetId) or (not target.assetId and
      (dev.productKey ~= target.productKey or (dev.deviceKey ~= target.deviceKey and
        not (o.finish and dev.deviceKey == target.newDeviceKey)))) then
    -- a reply about another device: nothing it says can be trusted to name the device to change
    local e = errors.new("protocol", "the platform answered the preflight read of " .. describe_target(target) ..
      " with another device (assetId " .. tostring(dev.assetId) .. ", deviceKey " .. tostring(dev.deviceKey) ..
      "); nothing was changed")
    e.refused = true
    ctx:finish(s, "failed", e.message)
    return nil, e
  end
  report.old = copy_fields(dev, DEVICE_FIELDS)
  report.old.deviceName = type(dev.deviceName) == "table" and dev.deviceName.defaultValue or dev.deviceName
  ctx.asset = { assetId = dev.assetId, orgId = target.orgId }
  local function refuse(kind, msg, fields)
    local e = errors.new(kind, msg, fields)
    e.refused = true
    ctx:finish(s, "refused", msg)
    return nil, e
  end
  local pkind, pmsg, pfields = M.device_problem(dev, target)
  if o.finish and dev.deviceKey ~= target.newDeviceKey then
    -- finish replaces nothing: a device without the new key was not replaced (or was changed since)
    return refuse("conflict", "finish: device " .. tostring(dev.assetId) .. " has key " .. tostring(dev.deviceKey) ..
      ", not " .. target.newDeviceKey .. ": it was not replaced with that key, so there is nothing to finish " ..
      "(run it without finish to replace it); nothing was changed", { found_key = dev.deviceKey })
  end
  if pkind and o.finish and dev.deviceKey == target.newDeviceKey then
    ctx.finishing = true           -- replaced before: only what is left is done
  elseif pkind then
    if dev.deviceKey == target.newDeviceKey then
      pmsg = pmsg .. "; to finish what is left of that replace (secret, certificate, gateway link, tags), " ..
        "run it again with --finish (finish = true)"
    end
    return refuse(pkind, pmsg, pfields)
  end
  if o.check_free and not ctx.finishing then
    local expr = string.format("productKey = '%s' and deviceKey = '%s'", dev.productKey, target.newDeviceKey)
    local list, serr = ctx:read(function()
      return client:search_devices { expression = expr, pageNo = 1, pageSize = 10, orgId = target.orgId }
    end)
    ctx.reads[#ctx.reads + 1] = "Search Device (is the new key free?)"
    if not list then
      ctx:warn("could not check that newDeviceKey is free (" .. tostring(serr) .. "); the replace will tell")
    else
      for _, d in ipairs(list) do
        if d.deviceKey == target.newDeviceKey and d.assetId ~= dev.assetId then
          return refuse("conflict", "newDeviceKey " .. target.newDeviceKey .. " is already used by asset " ..
            tostring(d.assetId) .. " in product " .. tostring(dev.productKey), { field = "newDeviceKey" })
        end
      end
    end
  end
  if dev.productType == "Gateway" then
    local subs, page = {}, 1
    while true do
      local list, pg = ctx:read(function()
        return client:search_sub_devices { assetId = dev.assetId, orgId = target.orgId, pageNo = page, pageSize = 200 }
      end)
      if not list then
        pg.message = "cannot list the gateway's sub-devices: " .. tostring(pg.message)
        ctx:finish(s, "failed", tostring(pg))
        return nil, pg
      end
      for _, d in ipairs(list) do
        subs[#subs + 1] = { assetId = d.assetId, productKey = d.productKey, deviceKey = d.deviceKey }
      end
      local total = type(pg) == "table" and tonumber(pg.totalSize)
      if #list < 200 or not total or #subs >= total then break end
      page = page + 1
    end
    ctx.subs_before = subs
    ctx.reads[#ctx.reads + 1] = "Search Sub-Device"
    report.subdevices = { before = #subs, after = nil, reattached = 0 }
  end
  local ropts = { read = function(fn, ...) return ctx:read(fn, ...) end }
  ctx.ropts = ropts
  local given = ctx.known and ctx.known.gateway
  if dev.productType ~= "Gateway" and (o.check_gateway or given) then
    local gw, gerr
    if given then gw = given       -- (the batch's journal names it on a resume)
    else
      gw, gerr = aftercare.gateway_of(client, dev.assetId, target.orgId, ropts)
      ctx.reads[#ctx.reads + 1] = "Get Gateway"
    end
    if gw == nil then
      ctx:warn("could not ask for the device's gateway (" .. tostring(gerr) .. "): its link is not checked")
    elseif gw then
      ctx.gateway = gw
      report.gateway = { assetId = gw.assetId, productKey = gw.productKey, deviceKey = gw.deviceKey }
    end
  end
  if o.csr or o.check_certificates then
    local valid, cerr = aftercare.valid_certificates(client, dev.assetId, target.orgId, ropts)
    ctx.reads[#ctx.reads + 1] = "List Certificate"
    if not valid and o.csr then
      cerr.message = "cannot list the device's certificates: " .. tostring(cerr.message)
      ctx:finish(s, "failed", tostring(cerr))
      return nil, cerr
    elseif not valid then
      ctx:warn("could not list the device's certificates (" .. tostring(cerr) .. "): if it authenticates with a " ..
        "certificate, the old unit's is still valid")
    else
      local mine = 0
      for _, c in ipairs(valid) do
        local info = ctx.finishing and o.csr_info and type(c.cert) == "string" and core.cert_info(c.cert)
        if info and info.key_sha256 == o.csr_info.key_sha256 then mine = mine + 1 end
      end
      report.certificates = { valid_before = #valid - mine }
      if #valid - mine > 0 and not o.csr then
        return refuse("invalid_argument", "device " .. dev.assetId .. " has " .. (#valid - mine) .. " valid " ..
          "certificate(s) (a two-way TLS product): after a replace the old unit's would still connect. Give the " ..
          "new unit's certificate signing request (--csr FILE, csr = PEM) so they are revoked and one is issued; " ..
          "nothing was changed", { field = "csr" })
      end
    end
  end
  ctx:finish(s, "ok", "%s %s/%s status %s%s%s%s", dev.assetId, tostring(dev.productKey),
    tostring(dev.deviceKey), tostring(dev.status), ctx.subs_before and (", " .. #ctx.subs_before .. " sub-devices") or "",
    ctx.gateway and (", behind gateway " .. ctx.gateway.assetId) or "",
    report.certificates and (", " .. report.certificates.valid_before .. " valid certificate(s)") or "")
  return dev
end

-- An outcome we did not see: the request may have been applied.
local function outcome_unknown(err)
  local k = err.kind
  if k == "transport" or k == "timeout" then return err.request_sent ~= false end
  return k == "server" or k == "rate_limited" or k == "protocol"
end

-- Reads the device back after an unknown outcome. Returns state, device|err:
-- "replaced" (with the secret when asked), "unchanged", "elsewhere" (key changed by someone else),
-- "unreadable".
local function read_back(ctx, client, target, old_key)
  local s = ctx:begin("reconcile")
  ctx:sleep_ms(ctx.o.settle_ms)
  -- one read, with the secret when it is wanted: if the replace happened, that is all a reconcile needs
  local want_secret = ctx.require_secret or nil
  local dev, err = ctx:read(function()
    return client:get_device { assetId = ctx.asset.assetId, orgId = target.orgId, requireSecret = want_secret }
  end)
  -- (judged as a batch's resume judges its rows: enos.reconcile)
  local state = dev and reconcile.judge(dev, { assetId = ctx.asset.assetId, newDeviceKey = target.newDeviceKey,
    old_key = old_key })
  if state == "other" then
    err = errors.new("protocol", "the read-back of asset " .. ctx.asset.assetId .. " answered with asset " ..
      tostring(dev.assetId))
    dev = nil
  end
  if not dev then
    ctx:finish(s, "failed", "read-back failed: " .. tostring(err))
    return "unreadable", err
  end
  ctx:finish(s, state, state == "replaced" and "device already has the new key " .. target.newDeviceKey
    or state == "unchanged" and "device still has key " .. tostring(old_key)
    or "device key is now " .. tostring(dev.deviceKey))
  return state, dev
end

local function result_of(r, reconciled)
  local new = {
    assetId = r.assetId, productKey = r.productKey, deviceKey = r.deviceKey, deviceSecret = r.deviceSecret,
    requestId = r.requestId, orgId = r.orgId,
  }
  if r.encrypted then new.encrypted = { deviceSecret = r.encrypted.deviceSecret, sessionKey = r.encrypted.sessionKey } end
  if r.err then new.decrypt_error = tostring(r.err) end
  new.reconciled = reconciled or nil
  return new
end

-- Whether a refusal says the device the request named does not exist (by productKey + deviceKey: its key
-- is no longer the one the preflight saw).
local function not_found(err)
  return err.kind == "not_found" or (err.kind == "invalid_argument" and err.code == 99400)
end

-- A replace reply must name the asset and the new key that were asked for. Returns nil | protocol error.
local function reply_mismatch(ctx, target, dev, r)
  local bad
  if r.assetId ~= ctx.asset.assetId then bad = "asset " .. tostring(r.assetId)
  elseif r.deviceKey ~= target.newDeviceKey then bad = "deviceKey " .. tostring(r.deviceKey)
  elseif r.productKey ~= nil and r.productKey ~= dev.productKey then bad = "productKey " .. tostring(r.productKey) end
  if not bad then return nil end
  return errors.new("protocol", "the replace reply names " .. bad .. ", not asset " .. ctx.asset.assetId ..
    " with key " .. target.newDeviceKey .. " as asked; its credentials are not used, the device is read back",
    { request_id = r.requestId })
end

-- The replace, by compare-and-swap: the request names the device by productKey + the deviceKey the
-- preflight saw, so the platform itself refuses it when the key changed in between (another operator,
-- another batch); the loser reads the device back and ends `conflict`, naming the key it found.
local function replace(ctx, client, target, dev)
  local params = { productKey = dev.productKey, deviceKey = dev.deviceKey, orgId = target.orgId,
    newDeviceKey = target.newDeviceKey }
  if ctx.require_secret then params.requireSecret = true end
  local unknown_seen, last_err, claimed = false, nil, nil  -- luacheck: ignore 311
  local attempt = 0
  while true do
    attempt = attempt + 1
    ctx.report.attempts = attempt
    local s = ctx:begin("replace")
    local r, err = client:replace_device(params)
    -- a reply naming another asset with our new key: a lie, or the platform replaced that asset (the key the
    -- preflight read moved to it meanwhile); the read-backs below tell which, never the reply itself
    if r and type(r.assetId) == "string" and r.assetId ~= ctx.asset.assetId and r.deviceKey == target.newDeviceKey then
      claimed = r.assetId
    end
    if r then
      err = reply_mismatch(ctx, target, dev, r)
      if not err then
        ctx:finish(s, "ok", "attempt %d, request %s", attempt, tostring(r.requestId))
        return result_of(r, false), nil, "replaced"
      end
    end
    last_err = err
    local unknown = outcome_unknown(err)
    local not_sent = (err.kind == "transport" or err.kind == "timeout") and err.request_sent == false
    ctx:finish(s, unknown and "unknown" or "failed", string.format("attempt %d: %s", attempt, tostring(err)))
    if unknown or unknown_seen or not_found(err) then
      -- Our earlier attempt may have taken the key: a conflict or "not found" now proves nothing.
      -- A first "not found" by the preflight's key: someone changed the device meanwhile (read to say who).
      local lost_race = not (unknown or unknown_seen)
      unknown_seen = unknown_seen or unknown
      local state, d = read_back(ctx, client, target, dev.deviceKey)
      if state == "replaced" and not lost_race then
        return result_of(d, true), nil, "reconciled"
      elseif state == "unreadable" then
        if lost_race then
          err.message = tostring(err.message) .. " (the device could not be read back: " .. tostring(d) .. ")"
          return nil, err, "refused"
        end
        local e = errors.new(last_err.kind, "OUTCOME UNKNOWN: the replace of asset " .. ctx.asset.assetId ..
          " may have happened (" .. tostring(last_err.message) .. ") and reading the device back failed (" ..
          tostring(d) .. "); check it with Get Device before retrying", {
            code = last_err.code, status = last_err.status, request_id = last_err.request_id,
            outcome_unknown = true, cause = d })
        return nil, e, "unknown"
      elseif (state == "elsewhere" or state == "replaced") and claimed then
        -- The platform says the asset asked for was not replaced (its key moved): did it replace the asset the
        -- reply named? Read that one, with its secret. If so, it happened: say it loudly, keep its credentials
        -- as read (its old hardware can no longer connect), never "nothing was changed".
        local other = ctx:read(client.get_device, client, { assetId = claimed, orgId = target.orgId,
          requireSecret = ctx.require_secret or nil })
        if other and other.assetId == claimed and other.deviceKey == target.newDeviceKey then
          local e = errors.new("conflict", "WRONG DEVICE: the platform applied this replace to asset " .. claimed ..
            ", not " .. ctx.asset.assetId .. ": between the preflight and the replace, key " ..
            tostring(dev.deviceKey) .. " moved from asset " .. ctx.asset.assetId .. " to asset " .. claimed ..
            " (another operator?). Asset " .. claimed .. " now has key " .. target.newDeviceKey .. " and a new " ..
            "secret (delivered with this outcome, so it is not lost); asset " .. ctx.asset.assetId ..
            " was not replaced (its key is now " .. tostring(d.deviceKey) .. "). Check both before going on",
            { wrong_device = claimed, request_id = last_err.request_id })
          return result_of(other, true), e, "wrong_device"
        end
      end
      if state == "elsewhere" or state == "replaced" then
        return nil, errors.new("conflict", "device " .. ctx.asset.assetId .. " changed since the preflight: its key is now " ..
          tostring(d.deviceKey) .. ", not " .. tostring(dev.deviceKey) .. " (another replace or operator?); " ..
          (lost_race and "the platform refused this replace, nothing was changed by it" or "not retrying"),
          { found_key = d.deviceKey, refused = lost_race or nil }), "conflict"
      end
      -- unchanged: retry only what may be retried
      if not (unknown or err.retryable) or attempt >= ctx.o.max_attempts then
        err.message = tostring(err.message) .. string.format(" (after %d attempt%s; read-back: device unchanged)",
          attempt, attempt == 1 and "" or "s")
        return nil, err, "failed"
      end
    elseif not (not_sent and attempt < ctx.o.max_attempts) then
      return nil, err, not_sent and "failed" or "refused"
    end
    -- (a request that never left is retried plainly)
    ctx:backoff(attempt, err)
  end
end

-- After a replace that happened: the new secret as asked for, or read with Get Device requireSecret when
-- the reply's is missing or does not decrypt (bounded: read_attempts reads, a settle pause between reads
-- that do not show the new key yet). Returns true | nil, err (the encrypted pair, if any, is kept).
local function fetch_secret(ctx, client, target)
  local new = ctx.report.new
  if M.secret_in_hand(client, ctx.require_secret, new) then return true end
  local s = ctx:begin("secret")
  local why = new.decrypt_error or "the reply carried no usable secret"
  local last
  for i = 1, ctx.o.read_attempts do
    local d, err = ctx:read(client.get_device, client,
      { assetId = ctx.asset.assetId, orgId = target.orgId, requireSecret = ctx.require_secret or nil })
    if d and d.assetId == ctx.asset.assetId and d.deviceKey == target.newDeviceKey then
      if M.secret_in_hand(client, ctx.require_secret, d) then
        new.deviceSecret = d.deviceSecret
        new.encrypted = d.encrypted and { deviceSecret = d.encrypted.deviceSecret, sessionKey = d.encrypted.sessionKey }
        new.decrypt_error = nil
        if not ctx.finishing then
          ctx:warn("the replace reply's secret was not usable (" .. tostring(why) .. "); read it with Get Device")
        end
        ctx:finish(s, "ok", "read with Get Device requireSecret (read %d)", i)
        return true
      end
      last = d.err and tostring(d.err) or "the device was read without a usable secret"
      if d.encrypted then new.encrypted = { deviceSecret = d.encrypted.deviceSecret, sessionKey = d.encrypted.sessionKey } end
    elseif d then
      last = "the read showed asset " .. tostring(d.assetId) .. " with key " .. tostring(d.deviceKey)
    else
      last = tostring(err)
    end
    if i < ctx.o.read_attempts then ctx:sleep_ms(ctx.o.settle_ms) end
  end
  local enc = new.encrypted and (new.encrypted.deviceSecret or new.encrypted.sessionKey)
  local e = errors.new("decrypt", "replaced, but the new deviceSecret is not in hand: " .. tostring(why) ..
    "; reading it back failed too (" .. tostring(last) .. ")" ..
    (enc and "; the encrypted pair is kept" or "") .. ". Read it with Get Device requireSecret (assetId " ..
    ctx.asset.assetId .. ")", { secret_missing = true, step = "secret" })
  ctx:finish(s, "failed", e.message)
  return nil, e
end

--- The verification of a replaced device as read back: `want` {assetId, newDeviceKey, productKey (nil: any)}.
-- Appends what is wrong to `problems` and what is worth saying to `notes` (both lists). The workflow's verify
-- step and the batch's verification in bulk both judge with this.
function M.check_replaced(dev, want, problems, notes)
  if dev.deviceKey ~= want.newDeviceKey then
    problems[#problems + 1] = "device shows key " .. tostring(dev.deviceKey) .. ", not " .. want.newDeviceKey
  end
  if dev.assetId ~= want.assetId then
    problems[#problems + 1] = "assetId changed to " .. tostring(dev.assetId)
  end
  if want.productKey and dev.productKey ~= want.productKey then
    problems[#problems + 1] = "productKey changed to " .. tostring(dev.productKey)
  end
  if dev.status == "online" or dev.status == "offline" then
    notes[#notes + 1] = "status " .. dev.status .. " (new hardware already connected)"
  elseif dev.status ~= "inactive" then
    problems[#problems + 1] = "status is " .. tostring(dev.status) .. ", expected inactive"
  end
end

--- The error the verification gives for `problems` (nil when there are none).
function M.verify_error(problems)
  if #problems == 0 then return nil end
  return errors.new("protocol", "verification failed: " .. table.concat(problems, "; "),
    { step = "verify", verify_failed = true })
end

local function verify(ctx, client, target)
  local s = ctx:begin("verify")
  local report = ctx.report
  local problems, notes = {}, {}
  local dev, err
  local ident = { assetId = ctx.asset.assetId, orgId = target.orgId }
  for i = 1, ctx.o.verify_attempts do
    dev, err = ctx:read(client.get_device, client, ident)
    if dev and dev.deviceKey == target.newDeviceKey then break end
    if i < ctx.o.verify_attempts then ctx:sleep_ms(ctx.o.settle_ms) end
  end
  if not dev then
    problems[#problems + 1] = "cannot read the device back: " .. tostring(err)
  else
    report.new.status = dev.status
    M.check_replaced(dev, { assetId = ctx.asset.assetId, newDeviceKey = target.newDeviceKey,
      productKey = report.old and report.old.productKey }, problems, notes)
  end
  if ctx.subs_before then
    local sub_problem = M._check_subs(ctx, client, target)
    if sub_problem then problems[#problems + 1] = sub_problem end
    local sd = report.subdevices
    if sd.reattached > 0 then notes[#notes + 1] = sd.reattached .. " sub-device(s) re-attached" end
  end
  if #problems > 0 then
    ctx:finish(s, "failed", table.concat(problems, "; "))
    return nil, M.verify_error(problems)
  end
  if #notes > 0 then ctx:finish(s, "ok", table.concat(notes, "; "))
  else ctx:finish(s, "ok", "key %s, assetId %s, status %s", target.newDeviceKey, ctx.asset.assetId, tostring(dev.status)) end
  return true
end

local function list_subs(ctx, client, target)
  local out, page = {}, 1
  while true do
    local list, pg = ctx:read(function()
      return client:search_sub_devices { assetId = ctx.asset.assetId, orgId = target.orgId, pageNo = page, pageSize = 200 }
    end)
    if not list then return nil, pg end
    for _, d in ipairs(list) do out[d.assetId] = d end
    local total = type(pg) == "table" and tonumber(pg.totalSize)
    if #list < 200 or not total or page * 200 >= total then break end
    page = page + 1
  end
  return out
end

-- Compares sub-devices with the preflight list; re-attaches missing ones. Returns a problem string or nil.
function M._check_subs(ctx, client, target)
  local sd = ctx.report.subdevices
  local now, err = list_subs(ctx, client, target)
  if not now then return "cannot list sub-devices: " .. tostring(err) end
  local missing = {}
  for _, d in ipairs(ctx.subs_before) do
    if not now[d.assetId] then
      missing[#missing + 1] = d.productKey and d.deviceKey and { productKey = d.productKey, deviceKey = d.deviceKey }
        or { assetId = d.assetId }
    end
  end
  local function count(t) local n = 0 for _ in pairs(t) do n = n + 1 end return n end
  sd.after = count(now)
  if #missing == 0 then return nil end
  ctx:warn(#missing .. " sub-device(s) of gateway " .. ctx.asset.assetId .. " were detached by the replace; re-attaching")
  local ok, aerr = client:add_sub_devices { assetId = ctx.asset.assetId, orgId = target.orgId, subDevices = missing }
  if not ok then
    sd.missing = missing
    return #missing .. " sub-device(s) missing and re-attaching failed: " .. tostring(aerr)
  end
  now, err = list_subs(ctx, client, target)
  if not now then return "cannot list sub-devices after re-attaching: " .. tostring(err) end
  sd.after = count(now)
  local still = {}
  for _, d in ipairs(ctx.subs_before) do if not now[d.assetId] then still[#still + 1] = d end end
  sd.reattached = #missing - #still
  if #still > 0 then
    sd.missing = still
    return #still .. " sub-device(s) still missing after re-attaching"
  end
  return nil
end

local function deliver(ctx, client)
  local report, o = ctx.report, ctx.o
  local new = report.new
  if ctx.require_secret and not new.deviceSecret and new.encrypted then
    ctx:warn(client:has_private_key() and "the new deviceSecret could not be decrypted (" ..
      tostring(new.decrypt_error) .. "); the encrypted pair is delivered instead" or
      "no private key loaded: the new deviceSecret is delivered encrypted")
  end
  if not o.steps and not o.out then return true end     -- lean: the caller delivers (no record)
  local s = ctx:begin("deliver")
  local rec = M.make_record(client, new, o.record)
  rec.outcome = report.outcome
  report._record = rec
  if not o.out then
    ctx:finish(s, "ok", "returned in the report")
    return true
  end
  local ok, err = M.write_private(o.out, M.render_record(rec, o.format), o.overwrite)
  if not ok then
    ctx:finish(s, "failed", err.message)
    err.step = "deliver"
    err.deliver_failed = true
    return nil, err
  end
  report.delivered = { path = o.out, format = o.format, secret = rec.deviceSecret and "clear" or
    (rec.encrypted and "encrypted" or "none") }
  ctx:finish(s, "ok", "written to " .. o.out .. " (mode 0600, " .. o.format .. ")")
  return true
end

local function wait_active(ctx, client, target)
  local s = ctx:begin("wait")
  local o = ctx.o
  local t0 = ctx:now()
  local deadline = t0 + o.wait_active * 1000
  local interval = math.max(o.poll_ms, 1)
  local w = { seconds = o.wait_active, online = false, polls = 0 }
  ctx.report.wait = w
  while true do
    w.polls = w.polls + 1
    local dev, err = client:get_device { assetId = ctx.asset.assetId, orgId = target.orgId }
    if dev then
      w.status = dev.status
      -- activeTime is reset by the replace: non-zero means the new hardware connected at least once
      if dev.deviceKey == target.newDeviceKey and (dev.status == "online" or (tonumber(dev.activeTime) or 0) > 0) then
        w.online = true
        w.active_time = dev.activeTime
        break
      end
    else
      w.errors = (w.errors or 0) + 1
      w.last_error = tostring(err)
    end
    local now = ctx:now()
    if now >= deadline then break end
    ctx:sleep_ms(math.floor(math.min(interval, deadline - now)))
    interval = math.min(interval * 1.5, o.poll_max_ms)
  end
  w.waited_ms = ctx:now() - t0
  if w.online then
    ctx:finish(s, "ok", "online after " .. fmt_ms(w.waited_ms) .. " (" .. w.polls .. " polls)")
  else
    ctx:finish(s, "timeout", "not online after " .. fmt_ms(w.waited_ms) .. " (last status " .. tostring(w.status) .. ")")
    ctx:warn("the new device did not come online within " .. o.wait_active .. " s")
  end
  return w.online
end

--- What the steps after the replace will do, in words (a dry run, a confirmation): a list of lines, or nil.
function M.after_plan(ctx, o)
  local out = {}
  if ctx.gateway then out[#out + 1] = "check the link to gateway " .. ctx.gateway.assetId .. " (add it back if dropped)" end
  local c = ctx.report.certificates
  if ctx.finishing then
    out[#out + 1] = "nothing is replaced again (the device has the new key): its secret is read back"
  end
  if o.csr then
    out[#out + 1] = "revoke " .. (c and c.valid_before or "the") .. " valid certificate(s) (superseded), then issue " ..
      "one for the new unit's CSR (" .. tostring(o.cert_authority) .. ", " .. o.cert_valid_day .. " days)" ..
      (ctx.finishing and " unless the one issued for its key is still valid" or "")
  end
  if o.tags and next(o.tags) or o.stamp then
    local names = {}
    for k in pairs(o.tags or {}) do names[#names + 1] = k end
    if o.stamp then names[#names + 1] = "replacedAt" names[#names + 1] = "replacedFrom" end
    table.sort(names)
    out[#out + 1] = "tag the asset: " .. table.concat(names, ", ")
  end
  return #out > 0 and out or nil
end

--- The steps after the replace (its secret in hand and delivered): the gateway link, the certificate swap, the
-- tags. Each reads before it writes (a second run does what is left). Returns nil | the first error.
function M._after(ctx, client, t, dev)
  local o, report = ctx.o, ctx.report
  local first
  local org = t.orgId
  local aid = ctx.asset.assetId
  if ctx.gateway then
    local s = ctx:begin("link")
    local r, err = aftercare.link(client, aid, org, ctx.gateway, ctx.ropts)
    if r then
      report.gateway.relinked = r.relinked
      if r.relinked then ctx:warn("the replace dropped the link to gateway " .. ctx.gateway.assetId .. "; it was added back") end
      ctx:finish(s, "ok", r.relinked and "link to gateway %s added back" or "still behind gateway %s", ctx.gateway.assetId)
    else
      err.step = "link"
      first = err
      report.gateway.link_error = tostring(err)
      ctx:finish(s, "failed", tostring(err))
    end
  end
  if o.csr then
    local s = ctx:begin("certificate")
    local r, err = aftercare.certificates(client, aid, org, { csr = o.csr, key_sha256 = o.csr_info.key_sha256,
      authority = o.cert_authority, valid_day = o.cert_valid_day, read = ctx.ropts.read,
      on_issued = o.on_cert_issued and function(c) o.on_cert_issued(c, report) end })
    local c = report.certificates or {}
    report.certificates = c
    c.revoked = r and r.revoked or (err.partial and err.partial.revoked) or {}
    if r then
      c.issued = r.cert and r.cert.certSn
      c.reused = r.reused or nil
      report.new.certificate = r.cert
      -- the record again, now with the certificate (the secret was delivered first: nothing can lose it)
      local rec = report._record
      if rec then
        rec.certSn, rec.certificate, rec.caCertificate = r.cert.certSn, r.cert.cert, r.cert.caCert
        if o.out then
          local ok, werr = M.write_private(o.out, M.render_record(rec, o.format), true)
          if not ok then err = werr end
        end
      end
      if not err then
        ctx:finish(s, "ok", "%d revoked (superseded), %s %s", #c.revoked, r.reused and "kept" or "issued",
          tostring(c.issued))
      end
    end
    if err then
      err.step = "certificate"
      first = first or err
      ctx:finish(s, "failed", tostring(err))
    end
  end
  if (o.tags and next(o.tags)) or o.stamp then
    local s = ctx:begin("tag")
    local old_key = ctx.finishing and (t.deviceKey or (ctx.known and ctx.known.old_key)) or dev.deviceKey
    local tags = aftercare.stamp_tags(o.tags, o.stamp, ctx.replaced_ms, old_key)
    if o.stamp and not old_key then tags.replacedFrom = nil end
    local r, err = aftercare.tag(client, aid, org, tags, not ctx.finishing and dev or nil, ctx.ropts)
    report.tags = tags
    if r then
      ctx:finish(s, "ok", r.updated and "tagged" or "already tagged")
    else
      err.step = "tag"
      first = first or err
      ctx:finish(s, "failed", tostring(err))
    end
  end
  return first
end

-- ---------------------------------------------------------------- the workflow

--- Replaces a device and does everything around it.
-- @param client an enos client
-- @param target {assetId=} or {productKey=, deviceKey=}, plus newDeviceKey (and optionally orgId)
-- @param opts see M.DEFAULTS, and: require_secret (default: when the client can decrypt, or V2.1),
--   dry_run, out, format, overwrite, wait_active (s), sleep(s), clock() (ms), confirm(plan, report) -> bool,
--   on_step(step, report), record (extra record fields), before_replace(device) (called with the device as the
--   preflight found it, just before the replace is sent)
-- @param known optional {device = the device as the caller read it for this target (a bulk read)}: the
--   preflight checks it instead of reading the device again
-- @return report | nil, err (err.report is the report so far). A report is returned whenever the replace
--   happened, even when verification or delivery failed (then report.ok is false and report.error says why).
function M.replace(client, target, opts, known)
  if type(client) ~= "table" then error("enos.workflow.replace: client expected", 2) end
  if type(target) ~= "table" then error("enos.workflow.replace: target table expected", 2) end
  if opts ~= nil and type(opts) ~= "table" then error("enos.workflow.replace: opts must be a table", 2) end
  local o, err
  if CHECKED[opts] then o = opts else
    o, err = check_opts(opts or {})
    if not o then return nil, err end
  end
  if known and known.csr then
    -- a CSR of this target's own (a batch row's): the options once more, with it
    local authority, info = aftercare.check_csr(known.csr)
    if not authority then return nil, errors.arg("csr", "the CSR is not usable: " .. info) end
    local o2 = {}
    for k, v in pairs(o) do o2[k] = v end
    o2.csr, o2.csr_info, o2.cert_authority = known.csr, info, authority
    o = o2
  end
  local t
  if CHECKED_TARGETS[target] then t = target else t, err = check_target(target) end
  if not t then return nil, err end
  local report = setmetatable({
    ok = false, outcome = nil, target = t, steps = {}, warnings = {}, attempts = 0,
  }, Report)
  local ctx = setmetatable({
    o = o, report = report, clock = o.clock or core.monotonic_ms, sleep = o.sleep or default_sleep,
    on_step = o.on_step,
  }, Ctx)
  ctx.t0 = ctx:now()
  ctx.known = known
  if o.require_secret == nil then
    ctx.require_secret = client.api_version ~= "v2.1" and client:has_private_key()
  else
    ctx.require_secret = o.require_secret and client.api_version ~= "v2.1"
  end
  report.require_secret = ctx.require_secret
  if client.api_version ~= "v2.1" and not ctx.require_secret then
    ctx:warn(o.require_secret == false and NOT_REQUESTED or NO_PRIVATE_KEY)
  end

  local dev
  dev, err = preflight(ctx, client, t, known and known.device)
  if not dev then return ctx:fail(err, "preflight", "refused") end

  if o.dry_run then
    local s = ctx:begin("dry_run")
    report.after = M.after_plan(ctx, o)
    local params = { productKey = dev.productKey, deviceKey = dev.deviceKey, orgId = t.orgId,
      newDeviceKey = t.newDeviceKey }
    if ctx.require_secret then params.requireSecret = true end
    local req, perr = client:prepare("replace_device", params)
    if not req then ctx:finish(s, "failed", tostring(perr)) return ctx:fail(perr, "dry_run", "refused") end
    local vreq = client:prepare("get_device", { assetId = dev.assetId, orgId = t.orgId })
    report.requests = { { name = "replace", text = tostring(req) } }
    if vreq then report.requests[2] = { name = "verify", text = tostring(vreq) } end
    report.reads = ctx.reads
    ctx:finish(s, "ok", "only reads sent (" .. table.concat(ctx.reads, ", ") .. "); the replace was not sent; " ..
      #report.requests .. " signed request(s) prepared")
    report.ok, report.outcome = true, "dry_run"
    report.ms = ctx:now() - ctx.t0
    return report
  end

  if o.confirm then
    local plan = {
      assetId = dev.assetId, productKey = dev.productKey, deviceKey = dev.deviceKey, status = dev.status,
      productType = dev.productType, newDeviceKey = t.newDeviceKey, require_secret = ctx.require_secret,
      out = o.out, subdevices = ctx.subs_before and #ctx.subs_before or nil, gateway = report.gateway,
      finishing = ctx.finishing,
      after = M.after_plan(ctx, o),
    }
    local asked_at = ctx:now()
    if not o.confirm(plan, report) then
      return ctx:fail(errors.new("invalid_argument", "aborted: not confirmed; nothing changed", { aborted = true }),
        "confirm", "aborted")
    end
    -- a person may answer minutes later: then the device is read again, and must still be the one confirmed
    local again, rerr = dev, nil
    if ctx:now() - asked_at > 1000 then
      again, rerr = ctx:read(client.get_device, client, { assetId = dev.assetId, orgId = t.orgId })
    end
    if not again then return ctx:fail(rerr, "preflight", "refused") end
    if again.assetId ~= dev.assetId or again.deviceKey ~= dev.deviceKey or again.productKey ~= dev.productKey then
      local e = errors.new("conflict", "device " .. dev.assetId .. " changed while waiting for the confirmation: its " ..
        "key is now " .. tostring(again.deviceKey) .. ", not " .. tostring(dev.deviceKey) .. "; nothing was sent",
        { found_key = again.deviceKey, refused = true })
      return ctx:fail(e, "confirm", "conflict")
    end
  end

  local new, how
  if ctx.finishing then
    -- replaced before (finish): nothing is sent again; the secret is read back below
    local s = ctx:begin("replace")
    new, how = { assetId = dev.assetId, productKey = dev.productKey, deviceKey = dev.deviceKey }, "finished"
    ctx:finish(s, "skipped", "already replaced: the device has key %s", t.newDeviceKey)
  else
    if o.before_replace then o.before_replace(dev, report) end   -- (the batch names the asset in its journal)
    new, err, how = replace(ctx, client, t, dev)
  end
  ctx.replaced_ms = known and known.replaced_ms or core.now_ms()
  if how == "wrong_device" then
    report.new, report.outcome = new, "wrong_device"
    local _, derr = deliver(ctx, client)
    if derr then err.message = err.message .. "; writing its credentials failed too: " .. tostring(derr) end
    return ctx:fail(err, "replace", "wrong_device")
  end
  if not new then
    if err.outcome_unknown then report.outcome = "unknown" end
    return ctx:fail(err, "replace", how)
  end
  report.new = new
  report.outcome = how
  report.ok = true

  -- From here the replace happened: always return the report, never nil.
  -- "Done" means the new secret is in hand: a reply without it (or whose secret does not decrypt) is
  -- followed by a read of it; still missing, the report is not ok (the encrypted pair, if any, is delivered).
  local _, serr = fetch_secret(ctx, client, t)
  if serr then report.ok = false; report.error = serr; report.secret_missing = true end
  new.gateway = report.gateway
  local _, derr = deliver(ctx, client)
  if derr then report.ok = false; report.error = report.error or derr end
  if not serr and o.on_replaced then o.on_replaced(report) end   -- (the batch journals the secret before what follows)
  if not serr and not derr then
    local aerr = M._after(ctx, client, t, dev)
    if aerr then report.ok = false; report.error = report.error or aerr end
  end

  if o.verify then
    local vok, verr = verify(ctx, client, t)
    if not vok then
      report.ok = false
      if not report.error then report.error = verr end
    end
  end

  if o.wait_active and o.wait_active > 0 then
    wait_active(ctx, client, t)
  end
  report.ms = ctx:now() - ctx.t0
  return report
end

return M
