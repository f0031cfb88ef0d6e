--- Example nginx endpoint for enos: `POST /replace` runs the replacement workflow, `GET /health` answers
-- at once. See README.md next to this file. Configuration comes from the environment (nginx `env`
-- directives) and from files read once in init_by_lua (in the master, before workers drop privileges);
-- never from the request.
--
--   ENOS_ENDPOINT, ENOS_ACCESS_KEY, ENOS_ORG_ID                  required
--   ENOS_SECRET_KEY_FILE (preferred) or ENOS_SECRET_KEY          required
--   ENOS_PRIVATE_KEY_FILE        the application's RSA private key (PKCS#8 PEM): decrypts new secrets
--   ENOS_ALLOW_SHOW_SECRET=1     lets a request ask for the new secret in clear ("show_secret": true)
--   ENOS_TOKEN_DICT              lua_shared_dict for the shared token (default enos_tokens; "" = none)
--   ENOS_TIMEOUT, ENOS_CONNECT_TIMEOUT   seconds (default 30, 10)
--   ENOS_SETTLE_MS               pause before a read-back after an unknown outcome (default 2000)
--   ENOS_VERIFY=0                skip the read-back verification after the replace
--   ENOS_CHECK_FREE=0            skip the search that newDeviceKey is free
--   ENOS_TRANSPORT=curl          force the blocking libcurl transport (stalls the worker: for comparison)
--   ENOS_CA_FILE                 CA file for ENOS_TRANSPORT=curl (cosockets use lua_ssl_trusted_certificate)
local cjson = require "cjson.safe"
local enos_ngx = require "enos.ngx"
local workflow = require "enos.workflow"
local secret = require "enos.secret"

local M = {}

local cfg          -- set by init()
local client       -- one per worker, made on first use

local function env(name, default)
  local v = os.getenv(name)
  if v == nil or v == "" then return default end
  return v
end

local function read_file(path, what)
  local f, e = io.open(path, "rb")
  if not f then error("enos endpoint: cannot read " .. what .. " file: " .. tostring(e), 0) end
  local s = f:read("*a")
  f:close()
  return s
end

local function flag(name, default)
  local v = env(name)
  if v == nil then return default end
  return v == "1" or v == "true" or v == "yes"
end

--- Reads the configuration. Call from init_by_lua*: a missing setting stops nginx from starting.
function M.init()
  local c = {
    endpoint = env("ENOS_ENDPOINT"), access_key = env("ENOS_ACCESS_KEY"), org_id = env("ENOS_ORG_ID"),
    allow_show_secret = flag("ENOS_ALLOW_SHOW_SECRET", false),
    shared_dict = env("ENOS_TOKEN_DICT", "enos_tokens"),
    timeout = tonumber(env("ENOS_TIMEOUT", "30")), connect_timeout = tonumber(env("ENOS_CONNECT_TIMEOUT", "10")),
    settle_ms = tonumber(env("ENOS_SETTLE_MS", "2000")),
    verify = flag("ENOS_VERIFY", true), check_free = flag("ENOS_CHECK_FREE", true),
    transport = env("ENOS_TRANSPORT", "ngx"), cafile = env("ENOS_CA_FILE"),
  }
  for _, k in ipairs { "endpoint", "access_key", "org_id" } do
    if not c[k] then error("enos endpoint: ENOS_" .. k:upper() .. " is not set (add `env ENOS_" .. k:upper() ..
      ";` to nginx.conf and set it)", 0) end
  end
  local skf = env("ENOS_SECRET_KEY_FILE")
  c.secret_key = skf and (read_file(skf, "secret key"):gsub("%s+$", "")) or env("ENOS_SECRET_KEY")
  if not c.secret_key or c.secret_key == "" then
    error("enos endpoint: set ENOS_SECRET_KEY_FILE (or ENOS_SECRET_KEY)", 0)
  end
  local pkf = env("ENOS_PRIVATE_KEY_FILE")
  if pkf then
    local key, kerr = secret.load_private_key { file = pkf }
    if not key then error("enos endpoint: private key: " .. tostring(kerr), 0) end
    c.private_key = key
  end
  if c.transport ~= "ngx" and c.transport ~= "curl" then error("enos endpoint: ENOS_TRANSPORT must be ngx or curl", 0) end
  if c.shared_dict == "" then c.shared_dict = nil end
  cfg = c
end

local function get_client()
  if client then return client end
  if not cfg then M.init() end
  local c, err = enos_ngx.client {
    endpoint = cfg.endpoint, access_key = cfg.access_key, secret_key = cfg.secret_key, org_id = cfg.org_id,
    private_key = cfg.private_key, timeout = cfg.timeout, connect_timeout = cfg.connect_timeout,
    shared_dict = cfg.shared_dict, transport = cfg.transport,
    cafile = cfg.transport == "curl" and cfg.cafile or nil,
  }
  if not c then return nil, err end
  client = c
  return client
end

-- ------------------------------------------------------------------ replies

--- HTTP status of an enos error kind.
M.STATUS = {
  invalid_argument = 400, not_found = 404, conflict = 409, permission = 403, rate_limited = 429,
  auth = 502, server = 502, transport = 502, tls = 502, protocol = 502, timeout = 504,
  config = 500, decrypt = 500,
}

local function send_json(status, doc, headers)
  ngx.status = status
  ngx.header["Content-Type"] = "application/json"
  ngx.header["Cache-Control"] = "no-store"
  for k, v in pairs(headers or {}) do ngx.header[k] = v end
  ngx.say((cjson.encode(doc):gsub("\\/", "/")))
  return ngx.exit(status)
end

local function error_doc(e)
  if type(e) ~= "table" then return { kind = "server", message = tostring(e) } end
  return {
    kind = e.kind, code = e.code, upstream_status = e.status, message = e.message, request_id = e.request_id,
    field = e.field, retryable = e.retryable, retry_after = e.retry_after, step = e.step,
    outcome_unknown = e.outcome_unknown or nil, refused = e.refused or nil,
  }
end

local function fail(status, kind, message, field)
  return send_json(status, { ok = false, error = { kind = kind, message = message, field = field } })
end

-- The report as JSON; the clear secret only when asked for and allowed.
local function report_doc(r, show_secret)
  local doc = {
    ok = r.ok, outcome = r.outcome, attempts = r.attempts, ms = r.ms and math.floor(r.ms + 0.5),
    target = r.target, old = r.old, warnings = r.warnings, require_secret = r.require_secret,
    subdevices = r.subdevices,
  }
  if r.new then
    local n = r.new
    doc.new = { assetId = n.assetId, productKey = n.productKey, deviceKey = n.deviceKey, status = n.status,
      requestId = n.requestId, reconciled = n.reconciled, decrypt_error = n.decrypt_error,
      encrypted = n.encrypted }
    if show_secret and n.deviceSecret then doc.new.deviceSecret = n.deviceSecret end
    doc.new.secret = n.deviceSecret and (show_secret and "clear" or "withheld") or
      (n.encrypted and "encrypted only" or "none")
  end
  local steps = {}
  for i, s in ipairs(r.steps or {}) do
    steps[i] = { name = s.name, outcome = s.outcome, ms = s.ms and math.floor(s.ms + 0.5),
      detail = s.detail ~= nil and tostring(s.detail) or nil }
  end
  doc.steps = steps
  if r.error then doc.error = error_doc(r.error) end
  if #doc.warnings == 0 then doc.warnings = cjson.empty_array end
  return doc
end

local FIELDS = { assetId = true, productKey = true, deviceKey = true, newDeviceKey = true, show_secret = true }

--- POST /replace: {assetId | productKey+deviceKey, newDeviceKey, show_secret?} -> the workflow report.
function M.replace()
  if ngx.req.get_method() ~= "POST" then
    return send_json(405, { ok = false, error = { kind = "invalid_argument", message = "use POST" } }, { Allow = "POST" })
  end
  ngx.req.read_body()
  local raw = ngx.req.get_body_data()
  if not raw then
    if ngx.req.get_body_file() then return fail(413, "invalid_argument", "request body too large") end
    return fail(400, "invalid_argument", "a JSON body is required")
  end
  local body = cjson.decode(raw)
  if type(body) ~= "table" or body[1] ~= nil then return fail(400, "invalid_argument", "the body must be a JSON object") end
  for k, v in pairs(body) do
    if not FIELDS[k] then return fail(400, "invalid_argument", "unknown field '" .. tostring(k) .. "'", tostring(k)) end
    if k == "show_secret" then
      if type(v) ~= "boolean" then return fail(400, "invalid_argument", "show_secret must be a boolean", k) end
    elseif type(v) ~= "string" then
      return fail(400, "invalid_argument", k .. " must be a string", k)
    end
  end
  if not cfg then M.init() end
  -- Refused before anything changes: a secret that is asked for and then withheld would be lost.
  if body.show_secret and not cfg.allow_show_secret then
    return fail(403, "permission", "show_secret is not allowed on this endpoint (ENOS_ALLOW_SHOW_SECRET)", "show_secret")
  end
  local c, cerr = get_client()
  if not c then return send_json(500, { ok = false, error = error_doc(cerr) }) end
  local target = { assetId = body.assetId, productKey = body.productKey, deviceKey = body.deviceKey,
    newDeviceKey = body.newDeviceKey }
  local report, err = workflow.replace(c, target, {
    sleep = enos_ngx.sleep, settle_ms = cfg.settle_ms, verify = cfg.verify, check_free = cfg.check_free,
  })
  if not report then
    local status = M.STATUS[err.kind] or 500
    if err.outcome_unknown then status = 504 end
    ngx.log(ngx.WARN, "enos: replace ", body.assetId or (tostring(body.productKey) .. "/" .. tostring(body.deviceKey)),
      " -> ", body.newDeviceKey, " failed: ", tostring(err))
    local doc = { ok = false, error = error_doc(err) }
    if err.report then
      doc.report = report_doc(err.report, false)
      doc.report.error = nil
    end
    local headers = err.retry_after and { ["Retry-After"] = tostring(math.ceil(err.retry_after)) } or nil
    return send_json(status, doc, headers)
  end
  ngx.log(ngx.INFO, "enos: replace ", tostring(report.new and report.new.assetId), " -> ", body.newDeviceKey, ": ",
    tostring(report.outcome))
  -- The replace happened (even when verification failed): 200, so the caller reads the new key.
  return send_json(200, report_doc(report, body.show_secret))
end

--- GET /health: answers without any I/O.
function M.health()
  return send_json(200, { ok = true, worker = ngx.worker.pid(), transport = cfg and cfg.transport or "ngx" })
end

return M
