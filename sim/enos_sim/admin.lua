-- Admin API under /__sim/ (loopback clients only, not signed). Replies {code=0,msg="OK",data=…};
-- errors use HTTP 400/403/404 with {code=<status>, msg=…}.
local util = require "enos_sim.util"
local conf = require "enos_sim.conf"
local store = require "enos_sim.store"
local devices = require "enos_sim.devices"
local faults = require "enos_sim.faults"
local auth = require "enos_sim.auth"

local M = {}

local LOOPBACK = { ["127.0.0.1"] = true, ["::1"] = true }

local function ok(data) return util.send(200, { code = 0, msg = "OK", data = data == nil and util.null or data }) end
local function err(status, msg) return util.send(status, { code = status, msg = msg }) end

-- A device description's fields, copied (a deviceName given as a string becomes EnOS's i18n object).
local function fields_of(d)
  local fields = {}
  for k, v in pairs(d) do fields[k] = v end
  if type(fields.deviceName) == "string" then fields.deviceName = { defaultValue = fields.deviceName, i18nValue = {} } end
  return fields
end

--- Seed one device from an admin/config description; returns dev or nil, message.
function M.seed(d)
  if type(d) ~= "table" then return nil, "a device must be an object" end
  local org = d.orgId or conf.default_org()
  if not conf.orgs[org] then return nil, "orgId " .. tostring(org) .. " does not exist" end
  if d.deviceKey ~= nil and not devices.valid_key(d.deviceKey) then return nil, "invalid deviceKey" end
  if d.gateway ~= nil then
    local gw = store.get(tostring(d.gateway))
    if not gw or gw.productType ~= "Gateway" then return nil, "gateway " .. tostring(d.gateway) .. " is not a gateway device" end
  end
  local dev, e = devices.insert(org, fields_of(d))
  if not dev then return nil, e.msg end
  return dev
end

--- Seed the config's devices (at start, and on reset under the lock). Writes directly: it runs
-- where ngx.sleep may be unavailable, and a per-device insert would count the product each time.
function M.seed_config()
  local list = conf.cfg.devices or {}
  for _, d in ipairs(list) do
    local p = conf.products[d.productKey]
    if not p then error("enos-sim: seed device: product " .. tostring(d.productKey) .. " does not exist") end
    local fields = fields_of(d)
    fields.deviceKey = fields.deviceKey or util.random_alnum(10)
    local dev = devices.new_device(d.orgId or conf.default_org(), p, fields)
    store.put(dev)
    if d.gateway then store.attach(d.gateway, dev.assetId) end
  end
end

local function reset(body)
  -- the same direct seeding as at start, under the lock: O(devices) (one insert at a time
  -- counted the product's devices each time, which took minutes for a large fleet)
  store.locked(function()
    store.clear()
    M.seed_config()
  end)
  faults.clear()
  faults.clear_log()
  local misc = ngx.shared.enos_misc
  for _, k in ipairs(misc:get_keys(0)) do
    if k:sub(1, 4) == "att:" or k:sub(1, 4) == "blk:" then misc:delete(k) end
  end
  if body.tokens then auth.clear() end
  return ok({ devices = #store.all() })
end

function M.handle()
  ngx.ctx.admin = true
  if not LOOPBACK[ngx.var.remote_addr] then return err(403, "the admin API answers loopback clients only") end
  local method, path = ngx.req.get_method(), ngx.var.uri:sub(8)  -- strip "/__sim/"
  local body = {}
  if method == "POST" or method == "PUT" then
    local b, e = util.body_json()
    if b == nil then return err(400, e) end
    body = b
  end
  if path == "health" then
    return ok({ status = "ok", pid = ngx.worker.pid() })
  elseif path == "devices" and method == "GET" then
    local args = ngx.req.get_uri_args()
    local out = {}
    for _, d in ipairs(store.all()) do
      if not args.orgId or d.orgId == args.orgId then
        d.gateway = store.gateway_of(d.assetId)
        out[#out + 1] = d
      end
    end
    return ok(util.list(out))
  elseif path == "devices" and method == "POST" then
    local list = body
    if body[1] == nil then list = { body } end
    local out = {}
    for _, d in ipairs(list) do
      local dev, e = M.seed(d)
      if not dev then return err(400, e) end
      out[#out + 1] = dev
    end
    return ok(out)
  elseif path:match("^devices/") and method == "GET" then
    local d = store.get(path:sub(9))
    if not d then return err(404, "device does not exist") end
    d.gateway = store.gateway_of(d.assetId)
    return ok(d)
  elseif path == "reset" and method == "POST" then
    return reset(body)
  elseif path == "log" and method == "GET" then
    local args = ngx.req.get_uri_args()
    local entries, last = faults.entries(tonumber(args.since), tonumber(args.limit))
    return util.send(200, { code = 0, msg = "OK", data = util.list(entries), seq = last })
  elseif path == "log" and method == "DELETE" then
    faults.clear_log()
    return ok(nil)
  elseif path == "faults" and method == "GET" then
    return ok(faults.current())
  elseif path == "faults" and method == "POST" then
    local expired
    if body.expire_token_now then expired = auth.expire_all() end
    local stored, e = faults.set(body)
    if not stored then return err(400, e) end
    return ok({ faults = stored, expired_tokens = expired })
  elseif path == "faults" and method == "DELETE" then
    faults.clear()
    return ok(nil)
  elseif path == "certificates" and method == "GET" then
    local args = ngx.req.get_uri_args()
    local recs = require("enos_sim.certs").records(args.assetId)
    for _, r in ipairs(recs) do r.key = nil end
    return ok(util.list(recs))
  elseif path == "tokens/expire" and method == "POST" then
    return ok({ expired_tokens = auth.expire_all() })
  end
  return err(404, "no admin route " .. method .. " /__sim/" .. path)
end

return M
