-- Entry points called from the generated nginx.conf: init (master), handle (content), log (log phase).
local conf = require "enos_sim.conf"
local util = require "enos_sim.util"
local store = require "enos_sim.store"
local auth = require "enos_sim.auth"
local devices = require "enos_sim.devices"
local faults = require "enos_sim.faults"
local admin = require "enos_sim.admin"
local certs = require "enos_sim.certs"

local M = {}

--- init_by_lua: load the config, then the state file or the seed devices.
function M.init(config_path)
  local cfg = conf.load(config_path)
  store.state_file = cfg.state_file
  if not (cfg.state_file and store.load(cfg.state_file)) then
    store.clear()
    admin.seed_config()
  end
end

function M.init_worker()
  math.randomseed(ngx.now() * 1000 + ngx.worker.pid())
  -- the state file holds every device's clear secret: whatever the worker creates is its owner's alone
  local ok, ffi = pcall(require, "ffi")
  if ok then
    pcall(ffi.cdef, "unsigned int umask(unsigned int mask);")
    ffi.C.umask(63)        -- 0077
  end
end

local ROUTES = {
  ["/apim-token-service/v2.0/token/get"] = "token.get",
  ["/apim-token-service/v2.0/token/refresh"] = "token.refresh",
  ["/device/login"] = "login",
}

local API = {}
for _, v in ipairs { "v2.1", "v2.4" } do
  API["/connect-service/" .. v .. "/devices"] = { v, "devices" }
  API["/connect-service/" .. v .. "/device-topos"] = { v, "topos" }
end
API["/connect-service/v2.0/certificates"] = { "v2.0", "certificates" }

function M.handle()
  local uri = ngx.var.uri
  if uri:sub(1, 7) == "/__sim/" then return admin.handle() end
  local ctx = ngx.ctx
  local route = ROUTES[uri]
  if route then
    ctx.op = route
    faults.before(route)
    if route == "token.get" then return auth.token_get() end
    if route == "token.refresh" then return auth.token_refresh() end
    return devices.login()
  end
  local api = API[uri]
  if not api then return util.gateway(404, "no Route matched with those values") end
  local args = ngx.req.get_uri_args(0)
  local action = args.action
  local entry
  if api[2] == "certificates" then entry = type(action) == "string" and certs.ACTIONS[action]
  else entry = type(action) == "string" and devices.action(api[2], action) end
  if not entry then return util.gateway(404, "no API matches action=" .. tostring(action)) end
  ctx.op = api[2] == "certificates" and ("cert." .. action) or action
  faults.before(ctx.op)
  local app = auth.verify(args)
  if not app then return end
  return devices.dispatch(entry, api[1], app, args)
end

--- The mutual-TLS listener's device login: a client certificate the simulator issued, valid, bound to the
-- asset the triple names; then the triple's sign as on the plain login.
function M.handle_mtls()
  ngx.ctx.op = "login.mtls"
  faults.before("login.mtls")
  local asset, why = certs.client_cert_asset()
  if not asset then return util.send(401, { code = 401, msg = "login refused: " .. why }) end
  return devices.login { cert_asset = asset, cert_sn = why }
end

function M.log()
  faults.log()
end

return M
