--- enos: replace IoT devices on Envision EnOS safely, fast and at fleet scale.
-- @module enos
local core = require "enos.core"
local client = require "enos.client"
local profile = require "enos.profile"
local errors = require "enos.errors"
local secret = require "enos.secret"

local enos = {
  _VERSION = core._VERSION,
  _NAME = "enos",
}

--- Versions of enos, Lua, libcurl and OpenSSL in use.
function enos.versions()
  local v = core.versions()
  v.lua = (type(jit) == "table" and jit.version) or _VERSION
  return v
end

--- Lowercase hex SHA-256 of s.
-- @function sha256_hex
-- @tparam string s
-- @treturn string
enos.sha256_hex = core.sha256_hex

--- The token service's `encryption` value.
function enos.token_encryption(app_key, timestamp_ms, app_secret)
  return core.token_encryption(app_key, timestamp_ms, app_secret)
end

--- The apim-signature of a request: {access_token, app_secret, query, body, timestamp}.
function enos.signature(p)
  if type(p) ~= "table" then error("enos.signature expects a table", 2) end
  -- misuse raises (docs/design.md), naming the field
  for _, k in ipairs { "access_token", "app_secret" } do
    if type(p[k]) ~= "string" then error("enos.signature: " .. k .. " must be a string, got " .. type(p[k]), 2) end
  end
  if p.query ~= nil and type(p.query) ~= "table" then error("enos.signature: query must be a table", 2) end
  if p.body ~= nil and type(p.body) ~= "string" then error("enos.signature: body must be a string", 2) end
  local q = {}
  for k, v in pairs(p.query or {}) do
    if type(v) == "boolean" then v = tostring(v)
    elseif type(v) == "number" then v = (v % 1 == 0) and string.format("%d", v) or tostring(v) end
    q[k] = v
  end
  return core.signature(p.access_token, p.app_secret, q, p.body, p.timestamp)
end

--- Loads an RSA private key: PEM text or {file = path} -> key | nil, err.
-- @function load_private_key
-- @param src PEM text, or {file = path}
enos.load_private_key = secret.load_private_key

--- Decrypts a V2.4 secret: {private_key, session_key, secret, scheme} -> plaintext | nil, err.
function enos.decrypt_secret(p)
  if type(p) ~= "table" then error("enos.decrypt_secret expects a table", 2) end
  for _, k in ipairs { "session_key", "secret" } do
    if type(p[k]) ~= "string" then
      return nil, errors.arg(k, k .. " must be a string (the encrypted value from EnOS)")
    end
  end
  local key = p.private_key
  if not core.is_key(key) then
    local err
    key, err = secret.load_private_key(key)
    if not key then return nil, errors.arg("private_key", err.message) end
  end
  return secret.decrypt(key, p.session_key, p.secret, p.scheme)
end

--- Creates a client (see README for options): client | nil, err (enos.client.new).
-- @function client
-- @tparam table opts client options (enos.client.OPTIONS)
enos.client = client.new

--- The error module (enos.errors): `enos.errors.is(v)`, the error kinds.
enos.errors = errors

-- Splits one-shot options into client options and call parameters.
local function split(opts)
  if type(opts) ~= "table" then error("enos: expected a table of options", 3) end
  local copts, params = {}, {}
  for k, v in pairs(opts) do
    if client.OPTIONS[k] then copts[k] = v else params[k] = v end
  end
  return copts, params
end

local function one_shot(method, opts)
  local copts, params = split(opts)
  local err
  -- the options given, then the environment, then the profile file: the CLI's rule (enos.profile)
  copts, err = profile.client_options(copts)
  if not copts then return nil, err end
  local c
  c, err = client.new(copts)
  if not c then return nil, err end
  if method == "replace_device" and params.requireSecret == nil and c.api_version ~= "v2.1" then
    params.requireSecret = c:has_private_key()   -- a configured private key: the new secret is asked for
  end
  local r, e = c[method](c, params)
  c:close()
  if r and method == "replace_device" and r.deviceSecret == nil then
    -- replaced, but no clear secret in hand: say so on the result (the caller must not think it has one)
    r.note = r.err and ("the new deviceSecret could not be decrypted: " .. tostring(r.err.message or r.err) ..
      "; the encrypted pair is in r.encrypted") or
      (c.api_version ~= "v2.1" and not params.requireSecret and "the new deviceSecret was not fetched " ..
        "(requireSecret off: no private key configured); read it later with Get Device requireSecret and the " ..
        "application's private key") or "the reply carried no deviceSecret"
  end
  return r, e
end

--- One-shot Replace Device with options from the table, the environment and the profile file. With a private
-- key configured it asks for the new secret (requireSecret) unless told otherwise; a result without a clear
-- deviceSecret carries `note` saying why.
-- @tparam table opts client options (enos.client.OPTIONS) and the call's parameters (assetId | productKey +
--   deviceKey, newDeviceKey, requireSecret, orgId)
-- @return the result of Client:replace_device (assetId, deviceKey, deviceSecret, requestId, …) | nil, err
function enos.replace_device(opts) return one_shot("replace_device", opts) end

--- One-shot Get Device with options from the table, the environment and the profile file.
-- @tparam table opts client options (enos.client.OPTIONS) and the call's parameters (assetId | productKey +
--   deviceKey, requireSecret, orgId)
-- @return the device (Client:get_device) | nil, err
function enos.get_device(opts) return one_shot("get_device", opts) end

-- Higher layers load on first use, so `require "enos"` stays light.
local LAZY = { workflow = "enos.workflow", batch = "enos.batch", scheduler = "enos.scheduler", plan = "enos.plan",
  fleet = "enos.fleet", aftercare = "enos.aftercare" }
setmetatable(enos, { __index = function(t, k)
  local name = LAZY[k]
  if not name then return nil end
  local m = require(name)
  rawset(t, k, m)
  return m
end })

return enos
