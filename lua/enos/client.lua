--- The EnOS client: validate → build → sign → send → interpret, written once
-- over an injected transport (`transport:send(req) -> res | nil, err`).
-- @module enos.client
local core = require "enos.core"
local errors = require "enos.errors"
local json = require "enos.json"
local secret = require "enos.secret"
local target_mod = require "enos.target"

local M = {}

--- Client options (snake_case), with their expected Lua types.
M.OPTIONS = {
  endpoint = "string", access_key = "string", secret_key = "string", org_id = "string",
  private_key = "any", private_key_file = "string", api_version = "string",
  timeout = "number", connect_timeout = "number", cafile = "string", capath = "string",
  verify_tls = "boolean", user_agent = "string", transport = "any", clock = "function",
  allow_insecure_http = "boolean", secret_scheme = "any", max_body = "number",
  token_cache = "any", warn = "function",
}

local TOKEN_GET = "/apim-token-service/v2.0/token/get"
local TOKEN_REFRESH = "/apim-token-service/v2.0/token/refresh"
local REFRESH_MARGIN_MS = 600 * 1000
local JSON_CT = "application/json;charset=UTF-8"

local Client = {}
Client.__index = Client
Client.__name = "enos.client"

-- ---------------------------------------------------------------- options

local valid_utf8 = json.valid_utf8

local function is_loopback(host)
  host = host:lower()
  return host == "localhost" or host:match("^127%.%d+%.%d+%.%d+$") ~= nil or host == "[::1]"
end

--- Splits an endpoint URL; returns {scheme, host, base} | nil, err.
function M.parse_endpoint(url, allow_insecure)
  if type(url) ~= "string" or url == "" then
    return nil, errors.new("config", "endpoint is required (e.g. https://apim-ppe1.envisioniot.com)", { field = "endpoint" })
  end
  local scheme, authority, path = url:match("^(%a[%w+.-]*)://([^/?#]+)([^?#]*)$")
  if not scheme then
    return nil, errors.new("config", "endpoint is not an http(s) URL without query: " ..
      require("enos.profile").redact_url(url), { field = "endpoint" })
  end
  scheme = scheme:lower()
  if scheme ~= "https" and scheme ~= "http" then
    return nil, errors.new("config", "endpoint must use https (or http on loopback): " ..
      require("enos.profile").redact_url(url), { field = "endpoint" })
  end
  if authority:find("@", 1, true) then
    return nil, errors.new("config", "endpoint must not carry user information", { field = "endpoint" })
  end
  local host = authority:match("^(%[[^%]]+%])") or authority:match("^([^:]+)")
  if scheme == "http" and not is_loopback(host) and not allow_insecure then
    return nil, errors.new("config",
      "refusing plain http to " .. host .. ": use https, or allow_insecure_http = true", { field = "endpoint" })
  end
  path = path:gsub("/+$", "")
  return { scheme = scheme, host = host, base = scheme .. "://" .. authority .. path }
end

local function check_options(opts)
  for k, v in pairs(opts) do
    local want = M.OPTIONS[k]
    if want == nil then
      return nil, errors.new("config", "unknown client option '" .. tostring(k) .. "'", { field = tostring(k) })
    end
    if want ~= "any" and type(v) ~= want then
      return nil, errors.new("config", "client option '" .. k .. "' must be a " .. want, { field = k })
    end
  end
  -- identifiers and secrets: non-empty, printable, bounded, UTF-8 (before they reach a header or a body)
  for k, max in pairs { endpoint = 2048, access_key = 256, secret_key = 256, org_id = 64, user_agent = 256,
    cafile = 4096, capath = 4096, private_key_file = 4096 } do
    local v = opts[k]
    if v ~= nil then
      local why = v == "" and "must not be empty" or #v > max and ("is longer than " .. max .. " bytes")
        or v:find("[%z\1-\31\127]") and "contains control characters" or not valid_utf8(v) and "is not valid UTF-8"
      if why then return nil, errors.new("config", "client option '" .. k .. "' " .. why, { field = k }) end
    end
  end
  for _, k in ipairs { "cafile", "capath" } do
    if opts[k] ~= nil then
      local st = core.stat(opts[k])
      if not st then
        return nil, errors.new("config", "client option '" .. k .. "': no such file or directory: " .. opts[k], { field = k })
      end
      -- (a FIFO or a device as the CA bundle would block or never end inside the TLS library)
      local why = k == "cafile" and require("enos.files").not_regular(opts[k], "CA file", 16 * 1024 * 1024)
        or (k == "capath" and st.type ~= "directory" and ("CA directory " .. opts[k] .. " is a " .. st.type))
      if why then return nil, errors.new("config", "client option '" .. k .. "': " .. why, { field = k }) end
    end
  end
  if opts.max_body ~= nil and not (opts.max_body >= 1024 and opts.max_body <= 1024 ^ 3) then
    return nil, errors.new("config", "max_body must be between 1 KiB and 1 GiB", { field = "max_body" })
  end
  for _, k in ipairs { "timeout", "connect_timeout" } do
    -- (libcurl counts milliseconds: below 1 ms a timeout would round to 0, which means none at all)
    if opts[k] ~= nil and not (opts[k] >= 0.001 and opts[k] <= 86400) then
      return nil, errors.new("config", k .. " must be between 0.001 and 86400 seconds", { field = k })
    end
  end
  if opts.api_version ~= nil and opts.api_version ~= "v2.4" and opts.api_version ~= "v2.1" then
    return nil, errors.new("config", "api_version must be \"v2.4\" or \"v2.1\"", { field = "api_version" })
  end
  if opts.transport ~= nil and (type(opts.transport) ~= "table" and type(opts.transport) ~= "userdata") then
    return nil, errors.new("config", "transport must be an object with a send method", { field = "transport" })
  end
  return true
end

--- Creates a client. Returns client | nil, err. Reads the private key file if given.
function M.new(opts)
  if type(opts) ~= "table" then error("enos.client: options must be a table", 2) end
  local ok, err = check_options(opts)
  if not ok then return nil, err end
  local ep
  ep, err = M.parse_endpoint(opts.endpoint, opts.allow_insecure_http)
  if not ep then return nil, err end
  local self = setmetatable({
    endpoint = ep.base,
    tls = ep.scheme == "https",
    access_key = opts.access_key,
    org_id = opts.org_id,
    api_version = opts.api_version or "v2.4",
    timeout = opts.timeout or 30,
    connect_timeout = opts.connect_timeout or 10,
    clock = opts.clock or core.now_ms,
    _secret_key = opts.secret_key,
    _transport_opts = {
      timeout = opts.timeout or 30, connect_timeout = opts.connect_timeout or 10,
      cafile = opts.cafile, capath = opts.capath, verify_tls = opts.verify_tls ~= false,
      user_agent = opts.user_agent, max_body = opts.max_body,
    },
    _transport = opts.transport,
    _token = nil,
    _last_ts = 0,
    _token_cache = opts.token_cache,
  }, Client)
  local warn = opts.warn or function(msg) io.stderr:write("enos: WARNING: ", msg, "\n") end
  if opts.verify_tls == false then
    warn("TLS certificate verification is OFF (verify_tls = false): anyone on the path can read the secrets")
  end
  local scheme
  scheme, err = secret.resolve(opts.secret_scheme)
  if not scheme then return nil, errors.new("config", err.message, { field = "secret_scheme" }) end
  self.secret_scheme = opts.secret_scheme or secret.DEFAULT
  if opts.private_key ~= nil and opts.private_key_file ~= nil then
    return nil, errors.new("config", "give private_key or private_key_file, not both", { field = "private_key" })
  end
  if opts.private_key_file then
    self._key, err = secret.load_private_key { file = opts.private_key_file }
    if not self._key then err.field = "private_key_file"; return nil, err end
    local mode = core.file_mode(opts.private_key_file)
    if mode and mode % 64 ~= 0 then
      warn(string.format("private key file %s is readable by group or others (mode %o): chmod 600 it",
        opts.private_key_file, mode))
    end
  elseif core.is_key(opts.private_key) then
    self._key = opts.private_key
  elseif opts.private_key ~= nil then
    if type(opts.private_key) ~= "string" then
      return nil, errors.new("config", "private_key must be PEM text or a key object", { field = "private_key" })
    end
    self._key, err = secret.load_private_key(opts.private_key)
    if not self._key then err.field = "private_key"; return nil, err end
  end
  return self
end

function Client:__tostring()
  local ak = self.access_key and (self.access_key:sub(1, 4) .. "…") or "none"
  return string.format("enos.client(%s, org %s, app %s, %s%s)", self.endpoint, tostring(self.org_id),
    ak, self.api_version, self._key and ", private key loaded" or "")
end

--- Whether the client can decrypt secrets.
function Client:has_private_key() return self._key ~= nil end

--- The transport the client sends through, made on first use when none was given: nginx cosockets inside
-- nginx (nil, err in a phase without them), else libcurl (enos.transport.curl).
-- @return transport | nil, err (also once the client is closed)
function Client:transport()
  if self._closed then return nil, errors.new("config", "client is closed") end
  if not self._transport then
    -- inside nginx: cosockets (nil, err in a phase without them); elsewhere: libcurl
    local t, err = require("enos.transport.ngx").auto(self._transport_opts)
    if t == nil then return nil, errors.from_transport(err) end
    self._transport = t or require("enos.transport.curl").new(self._transport_opts)
    self._own_transport = true
  end
  return self._transport
end

--- For a caller that drives the client's requests itself (the batch's scheduler): the options the client's
-- own transport is made with (a copy), and the transport it uses now when the caller gave it one (else nil).
function Client:transport_options()
  local o = {}
  for k, v in pairs(self._transport_opts or {}) do o[k] = v end
  local given = not (self._own_transport or self._transport == nil)
  return o, given and self._transport or nil
end

--- Sends this client's requests through `t` until the returned function is called (which puts the previous
-- transport back). The client does not close `t`.
function Client:use_transport(t)
  local saved, saved_own = self._transport, self._own_transport
  self._transport, self._own_transport = t, false
  return function() self._transport, self._own_transport = saved, saved_own end
end

--- Decrypts an encrypted pair {deviceSecret, sessionKey} (as journals keep it) with the client's private key:
-- the clear secret | nil, err.
function Client:decrypt_secret(enc)
  if not self._key then return nil, errors.new("config", "no private key loaded") end
  if type(enc) ~= "table" then return nil, errors.arg("encrypted", "an encrypted pair is expected") end
  return secret.decrypt(self._key, enc.sessionKey, enc.deviceSecret, self.secret_scheme)
end

--- Releases the transport (idempotent).
function Client:close()
  if self._own_transport and self._transport then self._transport:close() end
  self._transport = nil
  self._closed = true
end
Client.__gc = Client.close
Client.__close = Client.close

-- ---------------------------------------------------------------- timestamps and tokens

-- A fresh timestamp, strictly increasing per client (the token service
-- rejects a repeated encryption, so two requests never share a timestamp).
function Client:_timestamp()
  local now = math.floor(self.clock())
  if now <= self._last_ts then now = self._last_ts + 1 end
  self._last_ts = now
  return now
end

function Client:_secrets()
  return { self._secret_key, self._token and self._token.value }
end

local function token_error(status_code, msg)
  local m = "token service: " .. (msg ~= nil and tostring(msg) or "error")
  if status_code == 1002 then return errors.new("config", m .. " (appKey does not exist)", { code = status_code }) end
  if status_code == 1003 then return errors.new("auth", m .. " (check the secret key)", { code = status_code }) end
  if status_code == 1004 or status_code == 1202 then return errors.new("config", m, { code = status_code }) end
  if status_code == 1005 then return errors.new("server", m, { code = status_code, retryable = true }) end
  return errors.new("auth", m, { code = status_code })
end

function Client:_send_raw(req)
  local t, terr = self:transport()
  if not t then return nil, terr end
  local res, err = t:send(req)
  if not res then
    local e = errors.from_transport(err)
    e.message = errors.scrub(e.message, self:_secrets())
    return nil, e
  end
  return res
end

-- An HTTP 404 that is not an EnOS envelope: the URL is no EnOS API (a wrong endpoint or path), which no
-- retry or other device will fix: a configuration error, not "device not found".
local function not_an_endpoint(res, doc, url)
  if res.status ~= 404 or (type(doc) == "table" and type(doc.code) == "number") then return nil end
  return errors.new("config", "not an EnOS API endpoint: " .. tostring(url):gsub("%?.*$", "") ..
    " answered HTTP 404 (check the endpoint URL)", { status = 404 })
end

-- One request to the token service; returns {value, expires_at} | nil, err.
function Client:_token_request(path, extra)
  if not self.access_key or not self._secret_key then
    return nil, errors.new("config", "access_key and secret_key are required", { field = "access_key" })
  end
  local ts = self:_timestamp()
  local enc = core.token_encryption(self.access_key, ts, self._secret_key)
  local body = json.encode_object({ appKey = self.access_key, encryption = enc, timestamp = ts,
    accessToken = extra }, { "appKey", "encryption", "timestamp", "accessToken" })
  local res, err = self:_send_raw {
    method = "POST", url = self.endpoint .. path, body = body,
    headers = { ["Content-Type"] = "application/json" }, timeout = self.timeout,
    -- never re-sent as is (libcurl would, on a kept-alive connection that died): the service refuses an
    -- encryption it has seen (1001); a new request with a new timestamp is the retry
    once = true,
  }
  if not res then return nil, err end
  local bad_url = not_an_endpoint(res, json.decode(res.body or ""), self.endpoint .. path)
  if bad_url then return nil, bad_url end
  -- an HTTP error is the gateway's (503 outage, 429 throttling), whatever JSON it carries: never "auth"
  if res.status < 200 or res.status > 299 then
    return nil, errors.from_status(res.status, res.headers, errors.scrub(res.body, self:_secrets()))
  end
  local doc = json.decode(res.body)
  if type(doc) ~= "table" then
    return nil, errors.new("protocol", "token service reply is not JSON: " .. errors.trim(res.body, 80))
  end
  local st = doc.status
  if st == nil then st = doc.stauts end         -- a documented typo
  if type(st) ~= "number" then
    if res.status < 200 or res.status > 299 then
      return nil, errors.from_status(res.status, res.headers, errors.scrub(res.body, self:_secrets()))
    end
    return nil, errors.new("protocol", "token service reply has no status")
  end
  if st ~= 0 then return nil, token_error(st, doc.msg) end
  local data = type(doc.data) == "table" and doc.data or {}
  if type(data.accessToken) ~= "string" or data.accessToken == "" then
    return nil, errors.new("protocol", "token service reply has no accessToken")
  end
  local ttl = tonumber(data.expire) or 7200
  local now = self.clock()
  return { value = data.accessToken, expires_at = now + ttl * 1000, ttl = ttl }
end

-- Not due for a refresh: more than 10 minutes (or half its lifetime) left.
local function token_fresh(t, now) return now < t.expires_at - math.min(REFRESH_MARGIN_MS, t.ttl * 1000 / 2) end

-- Returns a valid token, fetching or refreshing as needed. Concurrent callers
-- (coroutines on a scheduler or in nginx) share one fetch: single flight.
function Client:_get_token(force)
  if self._token_fetching then
    local t = self:transport()
    if t and t.wait_for then
      t:wait_for(function() return not self._token_fetching end)
      if self._token and not force then return self._token.value end
    end
  end
  local now = self.clock()
  local tok = self._token
  -- missing or due: another worker may have refreshed it (the cache lets one caller fetch at a time)
  if not force and self._token_cache and not (tok and token_fresh(tok, now)) then
    local cached = self._token_cache:get(self)
    if cached then tok = cached; self._token = cached end
  end
  if not force and tok and token_fresh(tok, now) then return tok.value end
  self._token_fetching = true
  local newtok, err
  if tok and not force and now < tok.expires_at then
    newtok = self:_token_request(TOKEN_REFRESH, tok.value)
  end
  if not newtok then
    newtok, err = self:_token_request(TOKEN_GET)
    -- 1001: an earlier request of ours was taken but its reply lost; one more with a fresh timestamp
    if not newtok and err.code == 1001 then newtok, err = self:_token_request(TOKEN_GET) end
  end
  self._token_fetching = false
  if not newtok then
    if self._token_cache and self._token_cache.abort then self._token_cache:abort(self) end
    return nil, err
  end
  self._token = newtok
  if self._token_cache then self._token_cache:set(self, newtok) end
  return newtok.value
end

--- Makes sure the client holds a valid access token (fetching one if needed; one token request, or none when
-- it has a fresh one). A batch calls it first, so a wrong access or secret key stops it before any row starts.
-- @return true | nil, err (`auth` for a refused key, `config` for an unknown application…)
function Client:authenticate()
  local tok, err = self:_get_token()
  if not tok then return nil, err end
  return true
end

--- Drops the cached token (the next call fetches one).
function Client:reset_token() self._token = nil end

-- ---------------------------------------------------------------- signing and sending

local function stringify_query(q)
  local plain = true
  for _, v in pairs(q) do
    if type(v) ~= "string" then plain = false break end
  end
  if plain then return q end              -- the common case: already strings, nothing to copy
  local out = {}
  for k, v in pairs(q) do
    local tv = type(v)
    if tv == "boolean" then v = tostring(v)
    elseif tv == "number" then
      v = (v == math.floor(v) and math.abs(v) < 2^53) and string.format("%d", v) or tostring(v)
    elseif tv ~= "string" then
      return nil, errors.arg(tostring(k), "query value must be a string, number or boolean")
    end
    out[k] = v
  end
  return out
end

local Request = {}
Request.__name = "enos.request"
function Request.__tostring(r)
  local lines = { r.method .. " " .. r.url }
  local names = {}
  for k in pairs(r.headers) do names[#names + 1] = k end
  table.sort(names)
  for _, k in ipairs(names) do
    local v = r.headers[k]
    local lk = k:lower()
    if lk == "apim-accesstoken" or lk == "apim-signature" then v = "<redacted>" end
    lines[#lines + 1] = k .. ": " .. v
  end
  if r.body then lines[#lines + 1] = "" ; lines[#lines + 1] = r.body end
  return table.concat(lines, "\n")
end
--- The metatable of a prepared request (`Client:prepare`): its tostring shows the request with the access
-- token and the signature redacted.
M.Request = Request

--- Builds the signed request for spec {method, path, query, body}; needs a token.
function Client:_sign(spec, token)
  -- (plain_query: built here from checked strings only, nothing to convert)
  local query, err = spec.query
  if not spec.plain_query then
    query, err = stringify_query(query or {})
    if not query then return nil, err end
  end
  local ts = self:_timestamp()
  local sig, qs = core.sign_query(token, self._secret_key, query, spec.body, ts)
  local headers = {
    ["apim-accesstoken"] = token,
    ["apim-timestamp"] = string.format("%d", ts),
    ["apim-signature"] = sig,
  }
  if spec.body then headers["Content-Type"] = JSON_CT end
  return setmetatable({
    method = spec.method, url = self.endpoint .. spec.path .. (qs ~= "" and "?" .. qs or ""),
    headers = headers, body = spec.body, timeout = self.timeout,
    -- not idempotent: the transport must never re-send it on its own
    once = spec.idempotent == false or nil,
    call = spec.call,      -- the client call it belongs to ("replace_device", "get_device", …), for transports
  }, Request)
end

-- The gateway refused the token (before the service saw the call): a bare HTTP 401 whatever its body, code
-- 1203, or HTTP 200 with `apim_status` 4011 (refresh) / 4012 (get a new one), as Envision's SDKs expect.
local function token_rejected(res, doc)
  if res.status == 401 then return true end
  if type(doc) == "table" then
    if doc.code == 1203 or doc.status == 1203 then return true end
    local a = tonumber(doc.apim_status)
    if a == 4011 or a == 4012 then return true end
  end
  return false
end


-- Interprets a reply: data, envelope | nil, err.
function Client:_interpret(res, doc)
  if doc == nil then doc = json.decode(res.body or "") end
  if res.status < 200 or res.status > 299 then
    local e = errors.from_status(res.status, res.headers, errors.scrub(res.body, self:_secrets()))
    if type(doc) == "table" and type(doc.requestId) == "string" then e.request_id = doc.requestId end
    return nil, e
  end
  if type(doc) ~= "table" or type(doc.code) ~= "number" then
    return nil, errors.new("protocol", "reply is not the EnOS envelope: " ..
      errors.trim(errors.scrub(res.body, self:_secrets()), 120),
      { status = res.status })
  end
  -- (most replies have no null at all: then there is nothing to walk)
  if (res.body or ""):find("null", 1, true) then
    json.strip_null(doc, type(doc.data) == "table" and doc.data[1] ~= nil and 3 or 2)
  end
  if doc.code ~= 0 then
    local e = errors.from_code(doc.code, errors.scrub(doc.msg, self:_secrets()), doc.requestId)
    e.status = res.status
    return nil, e
  end
  local data = doc.data
  if data == nil then data = json.null end   -- success without data stays truthy
  return data, doc
end

--- Sends an API call spec {method, path, query, body}: data, envelope | nil, err.
function Client:_call(spec)
  if not self._secret_key then
    return nil, errors.new("config", "secret_key is required", { field = "secret_key" })
  end
  for attempt = 1, 2 do
    local token, err = self:_get_token()
    if not token then return nil, err end
    local req
    req, err = self:_sign(spec, token)
    if not req then return nil, err end
    local res
    res, err = self:_send_raw(req)
    if not res then return nil, err end
    if spec.serials and res.body then
      -- certificate serials are integers that may pass 2^53: read as the digits sent, never as a float
      res.body = res.body:gsub('("certS[Nn]"%s*:%s*)(%d+)', '%1"%2"')
    end
    local doc = json.decode(res.body or "")
    local bad_url = not_an_endpoint(res, doc, req.url)
    if bad_url then return nil, bad_url end
    local refused = token_rejected(res, doc)
    -- (a second refusal, with a fresh token: `auth`, with what the gateway said when it said something)
    if not refused or (attempt == 2 and (res.status == 401 or (type(doc) == "table" and doc.code == 1203))) then
      return self:_interpret(res, doc)
    end
    if attempt == 2 then break end
    -- Drop the token only if nobody replaced it meanwhile; the retry then
    -- fetches one (shared with concurrent callers). Safe for a replace too: the gateway refused it.
    if self._token and self._token.value == token then
      self._token = nil
      if self._token_cache then self._token_cache:set(self, nil, token) end  -- (only if still that one)
    end
  end
  return nil, errors.new("auth", "the gateway refused a freshly issued token too (HTTP 401, code 1203 or " ..
    "apim_status 4011/4012): check the application's access to this API", { status = 401 })
end

-- ---------------------------------------------------------------- calls

local function check_string(p, field, required, max)
  local v = p[field]
  if v == nil then
    if required then return nil, errors.arg(field, field .. " is required") end
    return true
  end
  -- the common case, printable ASCII of a fitting length, in one scan
  if type(v) == "string" and v ~= "" and #v <= (max or 256) and not v:find("[^\32-\126]") then return true end
  if type(v) ~= "string" then return nil, errors.arg(field, field .. " must be a string, got " .. type(v)) end
  if v == "" then return nil, errors.arg(field, field .. " must not be empty") end
  if #v > (max or 256) then return nil, errors.arg(field, field .. " is longer than " .. (max or 256) .. " bytes") end
  if v:find("[%z\1-\31\127]") then return nil, errors.arg(field, field .. " contains control characters") end
  if not valid_utf8(v) then return nil, errors.arg(field, field .. " is not valid UTF-8") end
  return true
end

local function check_bool(p, field)
  if p[field] ~= nil and type(p[field]) ~= "boolean" then
    return nil, errors.arg(field, field .. " must be a boolean")
  end
  return true
end

local function check_known(p, allowed, what)
  for k in pairs(p) do
    if not allowed[k] then
      return nil, errors.arg(tostring(k), "unknown parameter '" .. tostring(k) .. "' for " .. what)
    end
  end
  return true
end

--- Validates a device key (the new key of a replace): true | nil, err (enos.target's rule).
function M.check_device_key(v, field)
  local why = target_mod.key_problem(v, field)
  if why then return nil, errors.arg(field or "newDeviceKey", why) end
  return true
end

-- Resolves {assetId} | {productKey, deviceKey} plus orgId into query fields (checked by enos.target).
function Client:_target(p, query)
  local t, why, field = target_mod.check(p, { new_key = false })
  if not t then return nil, errors.arg(field, why) end
  local org = p.orgId or self.org_id
  if type(org) ~= "string" or org == "" then
    return nil, errors.arg("orgId", "orgId is required (set org_id on the client or orgId in the call)")
  end
  query.orgId = org
  query.assetId = p.assetId
  query.productKey = p.productKey
  query.deviceKey = p.deviceKey
  return query
end

local PATHS = {}       -- version → resource → path (the same few strings for every call)
function Client:_path(resource, version)
  version = version or self.api_version
  local by = PATHS[version]
  if not by then by = {} PATHS[version] = by end
  local p = by[resource]
  if not p then p = "/connect-service/" .. version .. "/" .. resource by[resource] = p end
  return p
end

-- Decrypts the deviceSecret of `data` in place when possible; returns an error
-- (kept on the result as `err`) when decryption failed. The encrypted pair is
-- always kept under `encrypted`.
function Client:_recover_secret(data)
  if self.api_version == "v2.1" then return nil end
  if data.deviceSecret == nil and data.sessionKey == nil then return nil end
  data.encrypted = { deviceSecret = data.deviceSecret, sessionKey = data.sessionKey }
  data.deviceSecret, data.sessionKey = nil, nil
  if not self._key then return nil end
  -- a transport that can (the scheduler's) decrypts in its worker thread, off the event loop
  local t = self._transport
  local run = t and t.decrypt and function(...) return t:decrypt(...) end
  local pt, err = secret.decrypt(self._key, data.encrypted.sessionKey, data.encrypted.deviceSecret,
    self.secret_scheme, run)
  if pt then data.deviceSecret = pt return nil end
  return err
end

local Result = {}
Result.__name = "enos.result"
function Result.__tostring(r)
  local keys = {}
  for k in pairs(r) do keys[#keys + 1] = k end
  table.sort(keys)
  local parts = {}
  for _, k in ipairs(keys) do
    local v = r[k]
    if k == "deviceSecret" or k == "sessionKey" or k == "encrypted" then v = "<redacted>"
    elseif type(v) == "table" then v = "{…}" else v = tostring(v) end
    parts[#parts + 1] = k .. "=" .. v
  end
  return "enos.result{" .. table.concat(parts, ", ") .. "}"
end
--- The metatable of a call's device results: tostring redacts deviceSecret, sessionKey and encrypted.
M.Result = Result

local CALLS = {}
--- The calls' request builders, by call name: `CALLS[name](client, params)` checks the parameters and returns
-- the request spec {method, path, query, body, …} | nil, err, without any I/O.
M.CALLS = CALLS

local REPLACE_PARAMS = { assetId = true, productKey = true, deviceKey = true, newDeviceKey = true,
  requireSecret = true, orgId = true }
--- Replace Device's request: {assetId | productKey + deviceKey, newDeviceKey, requireSecret, orgId}; never sent
-- again by the transport on its own (idempotent = false). Refuses newDeviceKey equal to deviceKey.
function CALLS.replace_device(self, p)
  local ok, err = check_known(p, REPLACE_PARAMS, "replace_device")
  if not ok then return nil, err end
  local query
  query, err = self:_target(p, { action = "replaceDevice" })
  if not query then return nil, err end
  ok, err = M.check_device_key(p.newDeviceKey)
  if not ok then return nil, err end
  ok, err = check_bool(p, "requireSecret")
  if not ok then return nil, err end
  if p.deviceKey and p.deviceKey == p.newDeviceKey then
    return nil, errors.arg("newDeviceKey", "newDeviceKey equals the current deviceKey (EnOS 11704)")
  end
  -- (newDeviceKey matched enos.target.KEY_PATTERN: nothing in it needs JSON escaping)
  local body = p.requireSecret and self.api_version ~= "v2.1"
    and '{"newDeviceKey":"' .. p.newDeviceKey .. '","requireSecret":true}'
    or '{"newDeviceKey":"' .. p.newDeviceKey .. '"}'
  return { method = "POST", path = self:_path("devices"), query = query, idempotent = false, body = body,
    plain_query = true }
end

local GET_PARAMS = { assetId = true, productKey = true, deviceKey = true, requireSecret = true, orgId = true }
--- Get Device's request: {assetId | productKey + deviceKey, requireSecret, orgId}.
function CALLS.get_device(self, p)
  local ok, err = check_known(p, GET_PARAMS, "get_device")
  if not ok then return nil, err end
  local query
  query, err = self:_target(p, { action = "get" })
  if not query then return nil, err end
  ok, err = check_bool(p, "requireSecret")
  if not ok then return nil, err end
  if p.requireSecret and self.api_version ~= "v2.1" then query.requireSecret = "true" end
  return { method = "GET", path = self:_path("devices"), query = query, plain_query = true }
end

local SEARCH_PARAMS = { expression = true, pageNo = true, pageSize = true, requireSecret = true, orgId = true,
  projection = true }
--- Search Device's request: {expression, pageNo (default 1), pageSize (1-200, default 100), requireSecret,
-- projection (field names), orgId}.
function CALLS.search_devices(self, p)
  local ok, err = check_known(p, SEARCH_PARAMS, "search_devices")
  if not ok then return nil, err end
  ok, err = check_string(p, "expression", false, 4096)
  if not ok then return nil, err end
  local org = p.orgId or self.org_id
  if type(org) ~= "string" or org == "" then return nil, errors.arg("orgId", "orgId is required") end
  local pageNo, pageSize = p.pageNo or 1, p.pageSize or 100
  if type(pageNo) ~= "number" or pageNo < 1 or pageNo % 1 ~= 0 then return nil, errors.arg("pageNo", "pageNo must be an integer >= 1") end
  if type(pageSize) ~= "number" or pageSize < 1 or pageSize > 200 or pageSize % 1 ~= 0 then
    return nil, errors.arg("pageSize", "pageSize must be an integer 1-200")
  end
  ok, err = check_bool(p, "requireSecret")
  if not ok then return nil, err end
  local projection = ""
  if p.projection ~= nil then
    if type(p.projection) ~= "table" or #p.projection == 0 then
      return nil, errors.arg("projection", "projection must be a non-empty list of field names")
    end
    local names = {}
    for i, name in ipairs(p.projection) do
      if type(name) ~= "string" or not name:match("^[%a_][%w_%.]*$") then
        return nil, errors.arg("projection", "projection must be a list of field names")
      end
      names[i] = json.encode(name)
    end
    projection = '"projection":[' .. table.concat(names, ",") .. "],"
  end
  local body = string.format('{%s%s%s"pagination":{"pageNo":%d,"pageSize":%d}}',
    p.expression and ('"expression":' .. json.encode(p.expression) .. ",") or "",
    (p.requireSecret and self.api_version ~= "v2.1") and '"requireSecret":true,' or "", projection, pageNo, pageSize)
  return { method = "POST", path = self:_path("devices"), query = { action = "search", orgId = org }, body = body }
end

local SUB_PARAMS = { assetId = true, productKey = true, deviceKey = true, orgId = true, pageNo = true, pageSize = true }
local function gateway_of(self, p, action, version)
  local query, err = self:_target(p, { action = action })
  if not query then return nil, err end
  local gw = p.assetId and { assetId = p.assetId } or { productKey = p.productKey, deviceKey = p.deviceKey }
  query.assetId, query.productKey, query.deviceKey = nil, nil, nil
  return { method = "POST", path = "/connect-service/" .. (version or self.api_version) .. "/device-topos",
    query = query, gateway = gw }
end

--- Search Sub-Device's request: the gateway {assetId | productKey + deviceKey, orgId}, pageNo, pageSize
-- (default 200).
function CALLS.search_sub_devices(self, p)
  local ok, err = check_known(p, SUB_PARAMS, "search_sub_devices")
  if not ok then return nil, err end
  local spec
  spec, err = gateway_of(self, p, "searchSubDevice")
  if not spec then return nil, err end
  spec.body = json.encode { gateway = spec.gateway,
    pagination = { pageNo = p.pageNo or 1, pageSize = p.pageSize or 200 } }
  spec.gateway = nil
  return spec
end

local ADD_SUB_PARAMS = { assetId = true, productKey = true, deviceKey = true, orgId = true, subDevices = true }
--- Add Sub-Device's request (API v2.1): the gateway {assetId | productKey + deviceKey, orgId} and subDevices (a
-- non-empty list); never sent again by the transport on its own (idempotent = false).
function CALLS.add_sub_devices(self, p)
  local ok, err = check_known(p, ADD_SUB_PARAMS, "add_sub_devices")
  if not ok then return nil, err end
  if type(p.subDevices) ~= "table" or #p.subDevices == 0 then
    return nil, errors.arg("subDevices", "subDevices must be a non-empty list")
  end
  local spec
  spec, err = gateway_of(self, p, "addSubDevice", "v2.1")
  if not spec then return nil, err end
  spec.body = json.encode { gateway = spec.gateway, subDevices = p.subDevices }
  spec.gateway = nil
  spec.idempotent = false
  return spec
end

local GW_PARAMS = { assetId = true, productKey = true, deviceKey = true, orgId = true }
--- Get Gateway's request (API v2.1): the device {assetId | productKey + deviceKey, orgId} whose gateway is asked.
function CALLS.get_gateway(self, p)
  local ok, err = check_known(p, GW_PARAMS, "get_gateway")
  if not ok then return nil, err end
  local query
  query, err = self:_target(p, { action = "getGateway" })
  if not query then return nil, err end
  return { method = "GET", path = "/connect-service/v2.1/device-topos", query = query, plain_query = true }
end

local UPDATE_PARAMS = { assetId = true, productKey = true, deviceKey = true, orgId = true, deviceName = true,
  timezone = true, deviceTags = true, deviceAttributes = true, deviceDesc = true }
--- Update Device's request (API v2.1, patch semantics): the device, plus `deviceName` ({defaultValue, i18nValue})
-- and `timezone`, which the platform requires on every update (send the device's current ones), and any of
-- `deviceTags` (a map of strings: the whole map is sent), `deviceAttributes`, `deviceDesc`.
function CALLS.update_device(self, p)
  local ok, err = check_known(p, UPDATE_PARAMS, "update_device")
  if not ok then return nil, err end
  local query
  query, err = self:_target(p, { action = "update" })
  if not query then return nil, err end
  if type(p.deviceName) ~= "table" or type(p.deviceName.defaultValue) ~= "string" then
    return nil, errors.arg("deviceName", "deviceName {defaultValue, i18nValue} is required by Update Device " ..
      "(send the device's current name)")
  end
  ok, err = check_string(p, "timezone", true, 64)
  if not ok then return nil, err end
  ok, err = check_string(p, "deviceDesc", false, 1024)
  if not ok then return nil, err end
  local body = { deviceName = { defaultValue = p.deviceName.defaultValue,
    i18nValue = type(p.deviceName.i18nValue) == "table" and p.deviceName.i18nValue or {} }, timezone = p.timezone, deviceDesc = p.deviceDesc }
  if p.deviceTags ~= nil then
    if type(p.deviceTags) ~= "table" or p.deviceTags[1] ~= nil then
      return nil, errors.arg("deviceTags", "deviceTags must be a map of strings")
    end
    for k, v in pairs(p.deviceTags) do
      if type(k) ~= "string" or type(v) ~= "string" then
        return nil, errors.arg("deviceTags", "deviceTags must map strings to strings (tag " .. tostring(k) .. ")")
      end
    end
    body.deviceTags = p.deviceTags     -- (lua-cjson writes an empty table as {})
  end
  if p.deviceAttributes ~= nil then
    if type(p.deviceAttributes) ~= "table" then return nil, errors.arg("deviceAttributes", "deviceAttributes must be a map") end
    body.deviceAttributes = p.deviceAttributes
  end
  -- the same values sent twice leave the device the same: safe to send again
  return { method = "POST", path = "/connect-service/v2.1/devices", query = query, plain_query = true,
    body = json.encode_object(body, { "deviceName", "timezone" }) }
end

local CERT_PATH = "/connect-service/v2.0/certificates"
local CERT_LIST_PARAMS = { assetId = true, productKey = true, deviceKey = true, orgId = true }
--- List Certificate's request: the device {assetId | productKey + deviceKey, orgId}.
function CALLS.list_certificates(self, p)
  local ok, err = check_known(p, CERT_LIST_PARAMS, "list_certificates")
  if not ok then return nil, err end
  local query
  query, err = self:_target(p, { action = "list" })
  if not query then return nil, err end
  return { method = "GET", path = CERT_PATH, query = query, plain_query = true, serials = true }
end

local CSR_MAX = 16384
--- The problem with a CSR's text (PEM), or nil.
function M.csr_problem(csr)
  if type(csr) ~= "string" then return "csr must be the PEM text of a certificate signing request" end
  if #csr > CSR_MAX then return "csr is longer than " .. CSR_MAX .. " bytes" end
  if not csr:find("-----BEGIN CERTIFICATE REQUEST-----", 1, true)
      or not csr:find("-----END CERTIFICATE REQUEST-----", 1, true) then
    return "csr is not a PEM certificate signing request (no BEGIN/END CERTIFICATE REQUEST lines)"
  end
  if csr:find("PRIVATE KEY-----", 1, true) then
    return "csr holds a private key: give the certificate signing request only (the key stays on the device)"
  end
  return nil
end

local CERT_APPLY_PARAMS = { assetId = true, productKey = true, deviceKey = true, orgId = true, csr = true,
  validDay = true, issueAuthority = true }
--- Apply Certificate's request: the device, `csr` (PEM), `validDay` (default 730), `issueAuthority` (RSA | ECC);
-- never sent again by the transport on its own.
function CALLS.apply_certificate(self, p)
  local ok, err = check_known(p, CERT_APPLY_PARAMS, "apply_certificate")
  if not ok then return nil, err end
  local query
  query, err = self:_target(p, { action = "apply" })
  if not query then return nil, err end
  local why = M.csr_problem(p.csr)
  if why then return nil, errors.arg("csr", why) end
  local days = p.validDay or 730
  if type(days) ~= "number" or days < 1 or days % 1 ~= 0 or days > 36500 then
    return nil, errors.arg("validDay", "validDay must be a whole number of days, 1 or more")
  end
  local ia = p.issueAuthority or "RSA"
  if ia ~= "RSA" and ia ~= "ECC" then return nil, errors.arg("issueAuthority", "issueAuthority must be RSA or ECC") end
  return { method = "POST", path = CERT_PATH, query = query, plain_query = true, idempotent = false, serials = true,
    body = json.encode_object({ csr = p.csr, validDay = days, issueAuthority = ia }, { "csr", "validDay" }) }
end

--- The reasons a certificate is revoked for (RFC 5280 codes EnOS takes): name → code.
M.REVOKE_REASONS = { unspecified = 0, key_compromise = 1, affiliation_changed = 3, superseded = 4,
  cessation = 5, hold = 6, privilege_withdrawn = 9 }

local CERT_REVOKE_PARAMS = { assetId = true, productKey = true, deviceKey = true, orgId = true, certSn = true,
  reason = true }
--- Revoke Certificate's request: the device, `certSn` (the serial: digits, as list_certificates gives it) and
-- `reason` (default 4, superseded); never sent again by the transport on its own.
function CALLS.revoke_certificate(self, p)
  local ok, err = check_known(p, CERT_REVOKE_PARAMS, "revoke_certificate")
  if not ok then return nil, err end
  local query
  query, err = self:_target(p, { action = "revoke" })
  if not query then return nil, err end
  local sn = p.certSn
  if type(sn) == "number" and sn >= 0 and sn % 1 == 0 and sn < 2^53 then sn = string.format("%d", sn) end
  if type(sn) ~= "string" or not sn:match("^%d+$") or #sn > 50 then
    return nil, errors.arg("certSn", "certSn must be the certificate's serial number (digits)")
  end
  local reason = p.reason or 4
  local known = false
  for _, code in pairs(M.REVOKE_REASONS) do if code == reason then known = true end end
  if not known then return nil, errors.arg("reason", "reason must be one of 0, 1, 3, 4, 5, 6, 9 (4: superseded)") end
  return { method = "POST", path = CERT_PATH, query = query, plain_query = true, idempotent = false, serials = true,
    body = string.format('{"certSn":%s,"reason":%d}', sn, reason) }
end

--- Builds the signed request for a call without sending it (a dry run).
-- @return request table {method, url, headers, body} (tostring redacts the token) | nil, err
function Client:prepare(call, params)
  local build = CALLS[call]
  if not build then error("enos: unknown call '" .. tostring(call) .. "'", 2) end
  if type(params) ~= "table" then error("enos: " .. call .. " expects a table of parameters", 2) end
  local spec, err = build(self, params)
  if not spec then return nil, err end
  local token
  token, err = self:_get_token()
  if not token then return nil, err end
  return self:_sign(spec, token)
end

-- Checks p, builds the call `name` and sends it: data, envelope | nil, err.
local function call(self, name, p)
  if type(p) ~= "table" then error("enos: " .. name .. " expects a table of parameters", 3) end
  local spec, err = CALLS[name](self, p)
  if not spec then return nil, err end
  spec.call = name
  return self:_call(spec)
end

--- Replace Device: moves the asset to newDeviceKey and returns the new credentials.
function Client:replace_device(p)
  local data, env = call(self, "replace_device", p)
  if not data then return nil, env end
  if type(data) ~= "table" or type(data.assetId) ~= "string" or type(data.deviceKey) ~= "string" then
    return nil, errors.new("protocol", "replaceDevice reply has no assetId/deviceKey", { request_id = env.requestId })
  end
  -- The reply must name the device asked for and its new key: credentials for another device are never
  -- handed on (the outcome is unknown: read the device back).
  if data.deviceKey ~= p.newDeviceKey or (p.assetId and data.assetId ~= p.assetId)
      or (p.productKey and data.productKey ~= nil and data.productKey ~= p.productKey) then
    return nil, errors.new("protocol", "replaceDevice reply names another device (assetId " .. tostring(data.assetId) ..
      ", deviceKey " .. tostring(data.deviceKey) .. ") than the one asked for; its credentials are not used",
      { request_id = env.requestId })
  end
  local r = setmetatable({
    assetId = data.assetId, productKey = data.productKey, deviceKey = data.deviceKey,
    deviceSecret = data.deviceSecret, sessionKey = data.sessionKey, requestId = env.requestId,
  }, Result)
  r.err = self:_recover_secret(r)
  return r
end

--- Get Device: the Device table with EnOS's field names (secret decrypted when asked).
function Client:get_device(p)
  local data, env = call(self, "get_device", p)
  if not data then return nil, env end
  if type(data) ~= "table" then return nil, errors.new("protocol", "get reply has no device", { request_id = env.requestId }) end
  setmetatable(data, Result)
  data.requestId = env.requestId
  data.err = self:_recover_secret(data)
  return data
end

--- Search Device: list, pagination | nil, err.
function Client:search_devices(p)
  local data, env = call(self, "search_devices", p)
  if not data then return nil, env end
  if type(data) ~= "table" then data = {} end
  for _, d in ipairs(data) do setmetatable(d, Result) d.err = self:_recover_secret(d) end
  return data, env.pagination
end

--- Search Sub-Device of a gateway: list | nil, err.
function Client:search_sub_devices(p)
  local data, env = call(self, "search_sub_devices", p)
  if not data then return nil, env end
  return type(data) == "table" and data or {}, env.pagination
end

--- Add Sub-Device to a gateway.
function Client:add_sub_devices(p)
  local data, env = call(self, "add_sub_devices", p)     -- (not a tail call: errors name the caller)
  return data, env
end

--- Get Gateway: the gateway device a sub-device connects through, or false when it has none | nil, err.
function Client:get_gateway(p)
  local data, env = call(self, "get_gateway", p)
  if not data then return nil, env end
  if type(data) ~= "table" or type(data.assetId) ~= "string" then return false, env end
  return data, env
end

--- Update Device (patch): true | nil, err. See CALLS.update_device for the parameters.
function Client:update_device(p)
  local data, env = call(self, "update_device", p)
  if not data then return nil, env end
  return true, env
end

-- A certificate record as EnOS gives it, with the serial under one name (`certSn`, digits).
local function cert_of(c)
  if type(c) ~= "table" then return nil end
  local sn = c.certSn or c.certSN
  if type(sn) == "number" and sn % 1 == 0 then sn = string.format("%.0f", sn) end
  c.certSn, c.certSN = sn ~= nil and tostring(sn) or nil, nil
  return c
end

--- List Certificate: the device's certificates, each {certSn, cert, certStatus (0 valid, 1 revoked,
-- 2 expired), issuer, subject, expireDate, …} | nil, err.
function Client:list_certificates(p)
  local data, env = call(self, "list_certificates", p)
  if not data then return nil, env end
  local out = {}
  if type(data) == "table" then
    for _, c in ipairs(data) do out[#out + 1] = cert_of(c) end
  end
  return out, env
end

--- Apply Certificate: {certSn, cert, caCert, certChainURL, issueAuthority} | nil, err.
function Client:apply_certificate(p)
  local data, env = call(self, "apply_certificate", p)
  if not data then return nil, env end
  local c = cert_of(data)
  if not c or type(c.cert) ~= "string" or not c.certSn then
    return nil, errors.new("protocol", "apply certificate reply has no cert or certSn", { request_id = env.requestId })
  end
  return c, env
end

--- Revoke Certificate: true | nil, err.
function Client:revoke_certificate(p)
  local data, env = call(self, "revoke_certificate", p)
  if not data then return nil, env end
  return true, env
end

--- Any other EnOS call, signed the same way: data, envelope | nil, err.
-- orgId is added from the client unless the query has one (or sets it to false).
function Client:request(p)
  if type(p) ~= "table" then error("enos: request expects a table", 2) end
  local method = p.method or (p.body ~= nil and "POST" or "GET")
  if type(method) ~= "string" or not method:match("^%u+$") then return nil, errors.arg("method", "method must be an upper-case HTTP verb") end
  if type(p.path) ~= "string" or p.path:sub(1, 1) ~= "/" or p.path:find("[?#%s]") then
    return nil, errors.arg("path", "path must start with '/' and carry no query (use query = {...})")
  end
  local query = {}
  if p.query ~= nil then
    if type(p.query) ~= "table" then return nil, errors.arg("query", "query must be a table") end
    for k, v in pairs(p.query) do query[k] = v end
  end
  if query.orgId == nil and self.org_id then query.orgId = self.org_id end
  if query.orgId == false then query.orgId = nil end
  local body = p.body
  if type(body) == "table" then body = json.encode(body)
  elseif body ~= nil and type(body) ~= "string" then return nil, errors.arg("body", "body must be a table or a string") end
  -- GET is idempotent; anything else is treated as not, unless the caller says so
  local idempotent = method == "GET" or p.idempotent == true
  return self:_call { method = method, path = p.path, query = query, body = body, idempotent = idempotent }
end

return M
