--- enos-sim configuration: defaults, files (Lua or JSON), flags, and the effective table.
-- Runs under Lua 5.4 and LuaJIT; never uses enos.core.
-- @module enos.sim.config
local cjson = require "cjson"

local M = {}

local function read_file(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local s = f:read("*a")
  f:close()
  return s
end
M.read_file = read_file

local function is_list(t)
  return type(t) == "table" and (t[1] ~= nil or next(t) == nil)
end

--- Deep copy.
function M.copy(t)
  if type(t) ~= "table" then return t end
  local r = {}
  for k, v in pairs(t) do r[k] = M.copy(v) end
  return r
end

--- Merge `over` into a copy of `base`: maps merge key by key, lists and scalars replace.
function M.merge(base, over)
  local r = M.copy(base or {})
  for k, v in pairs(over or {}) do
    if type(v) == "table" and type(r[k]) == "table" and not is_list(v) and not is_list(r[k]) then
      r[k] = M.merge(r[k], v)
    else
      r[k] = M.copy(v)
    end
  end
  return r
end

--- Load a config file: JSON (by .json extension or a leading "{") or a Lua chunk returning a table.
function M.load_file(path)
  local text, err = read_file(path)
  if not text then return nil, "cannot read config " .. path .. ": " .. tostring(err) end
  if path:match("%.json$") or text:match("^%s*{") then
    local ok, t = pcall(cjson.decode, text)
    if not ok or type(t) ~= "table" then return nil, "config " .. path .. " is not a JSON object" end
    return t
  end
  local chunk, lerr
  if setfenv then
    chunk, lerr = loadstring(text, "@" .. path)
    if chunk then setfenv(chunk, {}) end
  else
    chunk, lerr = load(text, "@" .. path, "t", {})
  end
  if not chunk then return nil, "config " .. path .. ": " .. tostring(lerr) end
  local ok, t = pcall(chunk)
  if not ok then return nil, "config " .. path .. ": " .. tostring(t) end
  if type(t) ~= "table" then return nil, "config " .. path .. " must return a table" end
  return t
end

--- Parse a --secret-scheme value: a preset name, a JSON object, or "k=v,k=v".
function M.parse_scheme(s)
  if type(s) ~= "string" then return s end
  if s:match("^%s*{") then
    local ok, t = pcall(cjson.decode, s)
    if ok then return t end
    return nil, "--secret-scheme: invalid JSON"
  end
  if not s:find("=", 1, true) then return s end
  local t = {}
  for k, v in s:gmatch("([%w_]+)%s*=%s*([^,]+)") do t[k] = tonumber(v) or v end
  return t
end

local VALID = {
  rsa_padding = { pkcs1 = true, oaep = true, ["oaep-sha256"] = true },
  aes_mode = { ecb = true, cbc = true, gcm = true },
  key_format = { raw = true, base64 = true, hex = true },
  encoding = { base64 = true, base64url = true, hex = true },
  key_bits = { [128] = true, [192] = true, [256] = true },
}

local function check_scheme(s, where)
  if s == nil or s == "enos-v2.4" then return true end
  if type(s) ~= "table" then return nil, where .. ": unknown secret_scheme " .. tostring(s) .. " (use enos-v2.4 or a table)" end
  for k, v in pairs(s) do
    if not VALID[k] then return nil, where .. ": unknown secret_scheme option " .. tostring(k) end
    if not VALID[k][v] then return nil, where .. ": invalid secret_scheme." .. k .. " = " .. tostring(v) end
  end
  return true
end

--- Build the effective config from defaults, a file, a table and flags; resolves key files.
-- opts: config_file, config (table), access_key, secret_key, public_key_file, org, seed_product,
-- secret_scheme, state_file, token_ttl. Returns cfg or nil, err.
function M.build(defaults, opts)
  local cfg = M.copy(defaults)
  if opts.config_file then
    local t, err = M.load_file(opts.config_file)
    if not t then return nil, err end
    cfg = M.merge(cfg, t)
  end
  if opts.config then cfg = M.merge(cfg, opts.config) end
  cfg.apps = cfg.apps or {}
  if #cfg.apps == 0 then cfg.apps[1] = {} end
  local app = cfg.apps[1]
  if opts.access_key then app.access_key = opts.access_key end
  if opts.secret_key then app.secret_key = opts.secret_key end
  if opts.public_key_file then app.public_key_file = opts.public_key_file; app.public_key = nil end
  if opts.org then cfg.orgs = { opts.org } end
  if opts.seed_product then
    local pk, ptype = opts.seed_product:match("^([^:]+):?(.*)$")
    cfg.products = cfg.products or {}
    local found = false
    for _, p in ipairs(cfg.products) do if p.productKey == pk then found = true end end
    if not found then
      cfg.products[#cfg.products + 1] = {
        productKey = pk, productType = ptype ~= "" and ptype or "Device",
        productName = { defaultValue = pk, i18nValue = {} }, modelId = pk .. "_model",
      }
    end
  end
  if opts.secret_scheme then
    local s, err = M.parse_scheme(opts.secret_scheme)
    if s == nil then return nil, err end
    cfg.secret_scheme = s
  end
  if opts.token_ttl then cfg.token_ttl = opts.token_ttl end
  if opts.state_file then cfg.state_file = opts.state_file end
  local ok, err = check_scheme(cfg.secret_scheme, "config")
  if not ok then return nil, err end
  if type(cfg.orgs) ~= "table" or #cfg.orgs == 0 then return nil, "config: orgs must list at least one orgId" end
  local seen = {}
  for i, a in ipairs(cfg.apps) do
    if type(a.access_key) ~= "string" or a.access_key == "" then return nil, "config: apps[" .. i .. "].access_key is required" end
    if type(a.secret_key) ~= "string" or a.secret_key == "" then return nil, "config: apps[" .. i .. "].secret_key is required" end
    if seen[a.access_key] then return nil, "config: duplicate access_key " .. a.access_key end
    seen[a.access_key] = true
    if a.public_key_file and not a.public_key then
      local pem, rerr = read_file(a.public_key_file)
      if not pem then return nil, "config: cannot read public_key_file " .. a.public_key_file .. ": " .. tostring(rerr) end
      a.public_key = pem
    end
    if a.public_key and not a.public_key:find("-----BEGIN PUBLIC KEY-----", 1, true) then
      return nil, "config: apps[" .. i .. "].public_key must be a PEM public key (-----BEGIN PUBLIC KEY-----)"
    end
    ok, err = check_scheme(a.secret_scheme, "config: apps[" .. i .. "]")
    if not ok then return nil, err end
  end
  for i, p in ipairs(cfg.products or {}) do
    if type(p.productKey) ~= "string" then return nil, "config: products[" .. i .. "].productKey is required" end
    if p.productType ~= nil and p.productType ~= "Device" and p.productType ~= "Gateway" then
      return nil, "config: products[" .. i .. "].productType must be Device or Gateway"
    end
  end
  return cfg
end

return M
