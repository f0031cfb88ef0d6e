--- Spec helper: start/stop enos-sim on free ports and talk to it over real HTTP(S) with curl.
-- Load with `local sim = dofile("spec/sim_helper.lua")` (from the repo root). Independent of
-- enos.core: hashes come from luaossl, requests from the curl command.
--
--   local h = sim.start{ tls = true, config = {...}, workers = 2 }
--   h.url, h.admin_url, h.ca_file, h.prefix, h.port, h.pid, h.config, h.app (first app of config)
--   h:admin("POST", "/devices", { productKey = "pk_demo", deviceKey = "d1" }) -> status, json
--   h:call("POST", "/connect-service/v2.4/devices", { action = "create", orgId = … }, body) -> status, json, raw, headers
--   h:stop()  (idempotent; sim.stop_all() stops every handle still running)
local here = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "spec"
local root = here:match("^(.*)/spec$") or "."
package.path = root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;" .. package.path

local launcher = require "enos.sim"
local cjson = require "cjson"
local digest = require "openssl.digest"
local socket = require "socket"

local M = { root = root }

local running = {}

local function hex(s)
  return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end

function M.sha256_hex(s) return hex(digest.new("sha256"):final(s)) end

function M.now_ms() return math.floor(socket.gettime() * 1000) end

local function urlencode(s)
  return (tostring(s):gsub("[^%w%-%._~]", function(c) return string.format("%%%02X", c:byte()) end))
end
M.urlencode = urlencode

--- Query string from a map (sorted, for repeatability) or a list of {name, value} pairs (kept in order).
function M.query(params)
  if type(params) == "string" then return params end
  local parts = {}
  if params and params[1] then
    for _, kv in ipairs(params) do parts[#parts + 1] = urlencode(kv[1]) .. "=" .. urlencode(kv[2]) end
  else
    local names = {}
    for k in pairs(params or {}) do names[#names + 1] = k end
    table.sort(names)
    for _, k in ipairs(names) do parts[#parts + 1] = urlencode(k) .. "=" .. urlencode(params[k]) end
  end
  return table.concat(parts, "&")
end

--- The request signature (docs/protocol.md): sha256_hex(token .. P .. B .. T .. SK), P = sorted name..value.
function M.sign(token, params, body, ts, secret_key)
  local list = {}
  if params and params[1] then
    for _, kv in ipairs(params) do list[#list + 1] = { kv[1], kv[2] } end
  else
    for k, v in pairs(params or {}) do list[#list + 1] = { k, v } end
  end
  table.sort(list, function(a, b) return a[1] < b[1] end)
  local p = {}
  for _, kv in ipairs(list) do p[#p + 1] = kv[1] .. tostring(kv[2]) end
  return M.sha256_hex(token .. table.concat(p) .. (body or "") .. tostring(ts) .. secret_key)
end

--- An RSA key pair from luaossl: private PKCS#8 PEM, public SPKI PEM.
function M.keypair(bits)
  local pkey = require "openssl.pkey"
  local k = pkey.new { type = "RSA", bits = bits or 2048 }
  return k:toPEM("private"), k:toPEM("public")
end

local function q(s) return launcher.shell_quote(s) end

local function read_all(path)
  local f = io.open(path, "rb")
  if not f then return "" end
  local s = f:read("*a")
  f:close()
  return s
end

--- One HTTP request with curl. req: method, url, headers (map), body (string), ca_file, timeout.
-- Returns status, body, headers (lowercased names), or nil, "curl: …" when no HTTP reply came back.
function M.http(req)
  local bodyf, hdrf = os.tmpname(), os.tmpname()
  local cmd = { "curl -sS --http1.1 -o", q(bodyf), "-D", q(hdrf), "-w ' __code=%{http_code}'", "-X", req.method or "GET",
    "--max-time", tostring(req.timeout or 15) }
  if req.ca_file then cmd[#cmd + 1] = "--cacert " .. q(req.ca_file) end
  if req.cert_file then cmd[#cmd + 1] = "--cert " .. q(req.cert_file) .. " --key " .. q(req.key_file) end
  for k, v in pairs(req.headers or {}) do cmd[#cmd + 1] = "-H " .. q(k .. ": " .. v) end
  local inf
  if req.body then
    inf = os.tmpname()
    local f = io.open(inf, "wb")
    f:write(req.body)
    f:close()
    cmd[#cmd + 1] = "--data-binary @" .. q(inf)
  end
  cmd[#cmd + 1] = q(req.url)
  local p = io.popen(table.concat(cmd, " ") .. " 2>&1; echo \" __rc=$?\"")
  local out = p:read("*a")
  p:close()
  local body, hdr = read_all(bodyf), read_all(hdrf)
  os.remove(bodyf); os.remove(hdrf)
  if inf then os.remove(inf) end
  local rc = tonumber(out:match("__rc=(%d+)"))
  if rc ~= 0 then
    local msg = out:gsub("%s*__rc=%d+%s*$", ""):gsub("%s*__code=%d+", ""):gsub("^%s+", "")
    if not msg:find("^curl") then msg = "curl: " .. msg end
    return nil, msg .. " (exit " .. tostring(rc) .. ")", body
  end
  local headers = {}
  for line in hdr:gmatch("[^\r\n]+") do
    local k, v = line:match("^([^:]+):%s*(.*)$")
    if k then headers[k:lower()] = v end
  end
  return tonumber(out:match("__code=(%d%d%d)")), body, headers
end

local function decode(s)
  local ok, v = pcall(cjson.decode, s)
  if ok then return v end
  return nil
end
M.decode = decode

local Handle = {}
Handle.__index = Handle

--- Admin API call: returns HTTP status, decoded JSON body.
function Handle:admin(method, path, body)
  local st, raw = M.http {
    method = method, url = self.admin_url .. path, ca_file = self.ca_file,
    headers = body and { ["Content-Type"] = "application/json" } or nil,
    body = body and cjson.encode(body) or nil,
  }
  return st, st and decode(raw) or raw
end

--- Adds a device through the admin API (asserting it was accepted); returns it.
function Handle:seed(dev)
  local st, r = self:admin("POST", "/devices", dev)
  assert(st == 200, "seeding a device failed: " .. tostring(st) .. " " .. cjson.encode(r))
  return r.data[1]
end

--- A device as the simulator holds it (with its clear deviceSecret), or nil.
function Handle:device(asset_id)
  local _, r = self:admin("GET", "/devices/" .. asset_id)
  return type(r) == "table" and r.data or nil
end

--- The request log (entries after seq `since`).
function Handle:log(since)
  local _, r = self:admin("GET", "/log?since=" .. (since or 0))
  return r and r.data or {}, r and r.seq
end

--- Raw token-service call with a fresh timestamp; app = config app table (default the first).
function Handle:token_request(path, app, extra)
  app = app or self.app
  local ts = M.now_ms()
  local body = { appKey = app.access_key, timestamp = ts,
    encryption = M.sha256_hex(app.access_key .. string.format("%d", ts) .. app.secret_key) }
  for k, v in pairs(extra or {}) do body[k] = v end
  local st, raw = M.http { method = "POST", url = self.url .. "/apim-token-service/v2.0/token/" .. (path or "get"),
    ca_file = self.ca_file, headers = { ["Content-Type"] = "application/json" }, body = cjson.encode(body) }
  return st, st and decode(raw), raw
end

--- A valid access token for app (cached per app until the sim says otherwise).
function Handle:token(app, fresh)
  app = app or self.app
  self._tokens = self._tokens or {}
  if not fresh and self._tokens[app.access_key] then return self._tokens[app.access_key] end
  local st, r, raw = self:token_request("get", app)
  assert(st == 200 and r and (r.status or r.stauts) == 0, "token get failed: " .. tostring(st) .. " " .. tostring(raw))
  self._tokens[app.access_key] = r.data.accessToken
  return r.data.accessToken
end

--- A signed API call. params: map or list of {name, value}; body: table (JSON-encoded) or string.
-- opts: app, token, timestamp, signature (override), mutate(req) to tamper after signing, query (raw string),
-- no_retry (by default a 401 for an expired/unknown cached token fetches a new token and retries once).
-- Returns status, decoded JSON, raw body, headers (or nil, curl error).
function Handle:call(method, path, params, body, opts)
  opts = opts or {}
  local app = opts.app or self.app
  if type(body) == "table" then body = cjson.encode(body) end
  local token = opts.token or self:token(app)
  local ts = opts.timestamp or M.now_ms()
  local sig = opts.signature or M.sign(token, params, body, ts, app.secret_key)
  local req = {
    method = method, url = self.url .. path .. "?" .. (opts.query or M.query(params)), ca_file = self.ca_file,
    headers = { ["apim-accesstoken"] = token, ["apim-timestamp"] = tostring(ts), ["apim-signature"] = sig },
    body = body,
  }
  if body then req.headers["Content-Type"] = "application/json;charset=UTF-8" end
  if opts.mutate then opts.mutate(req) end
  local st, raw, headers = M.http(req)
  if not st then return nil, raw end
  local r = decode(raw)
  -- a cached token the sim expired meanwhile: fetch a fresh one once (like a real client would)
  local stale = r and (r.reason == "token_expired" or r.reason == "token_invalid")
  if st == 401 and stale and not opts.token and not opts.retried and not opts.no_retry then
    self:token(app, true)
    local o = {}
    for k, v in pairs(opts) do o[k] = v end
    o.retried = true
    return self:call(method, path, params, body, o)
  end
  return st, r, raw, headers
end

--- POST /device/login with a correctly computed (or given) sign.
function Handle:login(pk, dk, secret, opts)
  opts = opts or {}
  local cid, ts = opts.clientId or ("client-" .. dk), opts.timestamp or M.now_ms()
  local sign = opts.sign or M.sha256_hex("clientId" .. cid .. "deviceKey" .. dk .. "productKey" .. pk ..
    "timestamp" .. ts .. secret):upper()
  local st, raw = M.http { method = "POST", url = self.url .. "/device/login", ca_file = self.ca_file,
    headers = { ["Content-Type"] = "application/json" },
    body = cjson.encode { productKey = pk, deviceKey = dk, clientId = cid, timestamp = ts, sign = sign } }
  return st, st and decode(raw), raw
end

--- POST /device/login of a sub-device through its gateway's connection (the body names the gateway).
function Handle:login_via(gw_pk, gw_dk, pk, dk, secret)
  local cid, ts = "client-" .. dk, M.now_ms()
  local sign = M.sha256_hex("clientId" .. cid .. "deviceKey" .. dk .. "productKey" .. pk .. "timestamp" .. ts ..
    secret):upper()
  local st, raw = M.http { method = "POST", url = self.url .. "/device/login", ca_file = self.ca_file,
    headers = { ["Content-Type"] = "application/json" },
    body = cjson.encode { productKey = pk, deviceKey = dk, clientId = cid, timestamp = ts, sign = sign,
      gateway = { productKey = gw_pk, deviceKey = gw_dk } } }
  return st, st and decode(raw), raw
end

--- POST /device/login on the mutual-TLS listener, with a client certificate (cert_file and key_file, PEM; nil:
-- none) and the triple's sign.
function Handle:cert_login(pk, dk, secret, cert_file, key_file)
  local cid, ts = "client-" .. dk, M.now_ms()
  local sign = M.sha256_hex("clientId" .. cid .. "deviceKey" .. dk .. "productKey" .. pk .. "timestamp" .. ts ..
    secret):upper()
  local st, raw = M.http { method = "POST", url = self.mtls_url .. "/device/login", ca_file = self.mtls_ca,
    cert_file = cert_file, key_file = key_file, headers = { ["Content-Type"] = "application/json" },
    body = cjson.encode { productKey = pk, deviceKey = dk, clientId = cid, timestamp = ts, sign = sign } }
  return st, st and decode(raw), raw
end

--- Stop nginx (idempotent) and remove the prefix dir unless opts.keep_prefix was given at start.
function Handle:stop()
  if self.stopped then return true end
  self.stopped = true
  running[self] = nil
  local ok, err = launcher.stop(self.prefix)
  if not ok then
    -- last resort: kill by pid file
    local pid = launcher.read_pid(self.prefix) or self.pid
    if pid then os.execute("kill -9 " .. tonumber(pid) .. " 2>/dev/null") end
  end
  if not self.keep_prefix then launcher.remove_prefix(self.prefix) end
  return ok, err
end

--- Start a simulator. opts: tls, config (merged over defaults), workers, state_file, prefix, port,
-- keep_prefix, and any enos.sim.start option. Raises when it cannot start.
function M.start(opts)
  opts = opts or {}
  local o = {}
  for k, v in pairs(opts) do o[k] = v end
  o.sim_dir = o.sim_dir or (root .. "/sim")
  if o.access_log == nil then o.access_log = false end
  local info, err = launcher.start(o)
  if not info then error(err, 2) end
  local h = setmetatable(info, Handle)
  h.keep_prefix = opts.keep_prefix or os.getenv("ENOS_SIM_KEEP") ~= nil
  h.app = info.config.apps[1]
  running[h] = true
  return h
end

--- A handle for a simulator started elsewhere (e.g. by bin/enos-sim): t = {url, admin_url, ca_file, app, prefix}.
-- Its :stop() stops that simulator too.
function M.attach(t)
  local h = setmetatable(t, Handle)
  h.keep_prefix = true
  return h
end

--- Stop every simulator this helper started and has not stopped.
function M.stop_all()
  for h in pairs(running) do h:stop() end
end

-- Belt and braces: stop leftovers when the Lua state closes (5.4 table __gc, LuaJIT newproxy).
if newproxy then
  M._sentinel = newproxy(true)
  getmetatable(M._sentinel).__gc = function() M.stop_all() end
else
  M._sentinel = setmetatable({}, { __gc = function() M.stop_all() end })
end

return M
