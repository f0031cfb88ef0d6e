-- The effective configuration, loaded once in init_by_lua (the master) and inherited by every worker.
local cjson = require "cjson.safe"
local secret = require "enos_sim.secret"

local M = { cfg = nil, apps = {}, orgs = {}, products = {} }

--- Load the JSON config the launcher wrote; raises on error so nginx refuses to start.
function M.load(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  local cfg, err = cjson.decode(s)
  if type(cfg) ~= "table" then error("enos-sim: bad config " .. path .. ": " .. tostring(err)) end
  M.set(cfg)
  return cfg
end

function M.set(cfg)
  local scheme, err = secret.scheme(cfg.secret_scheme)
  if not scheme then error("enos-sim: " .. err) end
  cfg.token_ttl = tonumber(cfg.token_ttl) or 7200
  cfg.clock_skew_ms = tonumber(cfg.clock_skew_ms) or 300000
  cfg.login = cfg.login or {}
  cfg.login.max_attempts = tonumber(cfg.login.max_attempts) or 4
  cfg.login.window_s = tonumber(cfg.login.window_s) or 120
  cfg.login.block_s = tonumber(cfg.login.block_s) or 300
  cfg.max_devices_per_product = tonumber(cfg.max_devices_per_product) or 10000
  cfg.log_size = tonumber(cfg.log_size) or 2000
  M.scheme = scheme
  M.orgs, M.apps, M.products = {}, {}, {}
  for _, o in ipairs(cfg.orgs or {}) do M.orgs[o] = true end
  for _, a in ipairs(cfg.apps or {}) do
    local app = { access_key = a.access_key, secret_key = a.secret_key, orgs = nil }
    if type(a.public_key) == "string" and a.public_key ~= "" then app.public_key = a.public_key end
    if type(a.orgs) == "table" and #a.orgs > 0 then
      app.orgs = {}
      for _, o in ipairs(a.orgs) do app.orgs[o] = true end
    end
    if a.secret_scheme ~= nil then
      local s, serr = secret.scheme(a.secret_scheme)
      if not s then error("enos-sim: app " .. tostring(a.access_key) .. ": " .. serr) end
      app.scheme = s
    end
    M.apps[a.access_key] = app
  end
  for _, p in ipairs(cfg.products or {}) do M.products[p.productKey] = p end
  M.cfg = cfg
end

function M.default_org()
  return (M.cfg.orgs or {})[1]
end

return M
