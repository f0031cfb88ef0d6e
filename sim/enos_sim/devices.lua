-- connect-service devices and device-topos (V2.4 and V2.1), and the device login endpoint.
local util = require "enos_sim.util"
local conf = require "enos_sim.conf"
local store = require "enos_sim.store"
local secret = require "enos_sim.secret"
local search = require "enos_sim.search"
local faults = require "enos_sim.faults"

local M = {}

local E_ARGS = "Invalid arguments"
local NOT_FOUND = "Invalid arguments: device does not exist"
local KEY_RULE = "must be 4-64 characters of letters, digits, '-', '_' or '.'"

function M.valid_key(k)
  return type(k) == "string" and #k >= 4 and #k <= 64 and not k:find("[^%w_%.%-]")
end

local function bad(msg) return { code = 99400, msg = E_ARGS .. ": " .. msg } end

--- Device record -> API view. secret_mode: nil (no secret), "clear", or an app (encrypt for it).
local function view(dev, secret_mode)
  local v = {}
  for k, x in pairs(dev) do v[k] = x end
  v.deviceSecret, v._changed = nil, nil
  if secret_mode == "clear" then
    v.deviceSecret = dev.deviceSecret
  elseif type(secret_mode) == "table" then
    v.deviceSecret, v.sessionKey = secret.encrypt(dev.deviceSecret, secret_mode.public_key,
      secret_mode.scheme or conf.scheme)
  end
  return v
end
M.view = view

-- Find a device from {assetId} or {productKey, deviceKey} in an org; returns dev or nil, err table.
local function lookup(org, ident)
  if type(ident) ~= "table" then return nil, bad("device identifier missing") end
  local aid = ident.assetId
  local dev
  if aid ~= nil and aid ~= "" then
    dev = store.get(tostring(aid))
  elseif ident.productKey and ident.productKey ~= "" and ident.deviceKey and ident.deviceKey ~= "" then
    local id = store.find_key(tostring(ident.productKey), tostring(ident.deviceKey))
    dev = id and store.get(id)
  else
    return nil, bad("assetId, or productKey and deviceKey, are required")
  end
  if not dev or dev.orgId ~= org then return nil, { code = 99400, msg = NOT_FOUND } end
  return dev
end
M.lookup = lookup

-- Decide how secrets are returned: returns mode or nil, err table.
local function secret_mode(version, app, require_secret)
  if version == "v2.1" then return "clear" end
  if require_secret == nil or require_secret == false or require_secret == "false" then return nil end
  if require_secret ~= true and require_secret ~= "true" then return nil, bad("requireSecret must be a boolean") end
  if not app.public_key then return nil, { code = 11858, msg = "Unable to find public key" } end
  return app
end

local function fail(e) return util.fail(e.code, e.msg) end

-- actions -------------------------------------------------------------------------

local function do_get(version, app, org, args)
  local mode, err = secret_mode(version, app, args.requireSecret)
  if err then return fail(err) end
  local dev
  dev, err = lookup(org, args)
  if not dev then return fail(err) end
  return util.ok(view(dev, mode))
end

local function new_device(org, p, fields)
  local now = util.now_ms()
  return {
    orgId = org,
    assetId = fields.assetId or store.new_asset_id(),
    modelId = p.modelId or "",
    productKey = p.productKey,
    productName = p.productName or { defaultValue = p.productKey, i18nValue = {} },
    productType = p.productType or "Device",
    deviceKey = fields.deviceKey,
    deviceName = fields.deviceName or { defaultValue = fields.deviceKey, i18nValue = {} },
    deviceSecret = fields.deviceSecret or util.random_alnum(20),
    deviceDesc = fields.deviceDesc or "",
    timezone = fields.timezone or "+08:00",
    deviceAttributes = fields.deviceAttributes or {},
    deviceTags = fields.deviceTags or {},
    createTime = fields.createTime or now,
    activeTime = fields.activeTime or 0,
    lastOnlineTime = fields.lastOnlineTime or 0,
    lastOfflineTime = fields.lastOfflineTime or 0,
    status = fields.status or "inactive",
  }
end
M.new_device = new_device

--- Insert a device under the lock (admin seeding uses this too); returns dev or nil, err table.
function M.insert(org, fields)
  local p = conf.products[fields.productKey]
  if not p then return nil, bad("product " .. tostring(fields.productKey) .. " does not exist") end
  if fields.deviceKey == nil then
    repeat fields.deviceKey = util.random_alnum(10) until not store.find_key(p.productKey, fields.deviceKey)
  end
  return store.locked(function()
    if store.find_key(p.productKey, fields.deviceKey) then return nil, { code = 11702, msg = "DeviceKey existed" } end
    if fields.assetId and store.get(fields.assetId) then return nil, bad("assetId " .. fields.assetId .. " existed") end
    if store.count_product(p.productKey) >= conf.cfg.max_devices_per_product then
      return nil, { code = 11739, msg = "Exceed max device size" }
    end
    local dev = new_device(org, p, fields)
    store.put(dev)
    if fields.gateway then store.attach(fields.gateway, dev.assetId) end
    return dev
  end)
end

local function do_create(version, app, org, body)
  local mode, err = secret_mode(version, app, body.requireSecret)
  if err then return fail(err) end
  if version == "v2.1" then mode = "clear" end
  if type(body.productKey) ~= "string" or body.productKey == "" then return fail(bad("productKey is required")) end
  if type(body.deviceName) ~= "table" or type(body.deviceName.defaultValue) ~= "string" then
    return fail(bad("deviceName.defaultValue is required"))
  end
  if type(body.timezone) ~= "string" or not body.timezone:match("^[+-]%d%d:%d%d$") then
    return fail(bad("timezone is required, e.g. +08:00"))
  end
  if body.deviceKey ~= nil and not M.valid_key(body.deviceKey) then return fail(bad("deviceKey " .. KEY_RULE)) end
  for _, f in ipairs { "deviceAttributes", "deviceTags" } do
    if body[f] ~= nil and type(body[f]) ~= "table" then return fail(bad(f .. " must be an object")) end
  end
  if body.deviceDesc ~= nil and type(body.deviceDesc) ~= "string" then return fail(bad("deviceDesc must be a string")) end
  local name = { defaultValue = body.deviceName.defaultValue, i18nValue = body.deviceName.i18nValue or {} }
  local dev
  dev, err = M.insert(org, {
    productKey = body.productKey, deviceKey = body.deviceKey, deviceName = name, timezone = body.timezone,
    deviceDesc = body.deviceDesc, deviceAttributes = body.deviceAttributes, deviceTags = body.deviceTags,
  })
  if not dev then return fail(err) end
  local v = view(dev, mode)
  return util.ok({ assetId = v.assetId, productKey = v.productKey, deviceKey = v.deviceKey,
    deviceSecret = v.deviceSecret, sessionKey = v.sessionKey })
end

local function paginate(list, pg)
  pg = type(pg) == "table" and pg or {}
  local no, size = tonumber(pg.pageNo) or 1, tonumber(pg.pageSize) or 10
  if no < 1 or no ~= math.floor(no) then return nil, bad("pagination.pageNo must be >= 1") end
  if size < 1 or size > 200 or size ~= math.floor(size) then return nil, bad("pagination.pageSize must be 1..200") end
  local page = {}
  for i = (no - 1) * size + 1, math.min(#list, no * size) do page[#page + 1] = list[i] end
  return page, { pageNo = no, pageSize = size, totalSize = #list }
end

-- The reply for one page of `list`, each device shown under secret_mode (only the projection's fields, if any).
local function reply_page(list, pagination, mode, projection)
  local page, pg = paginate(list, pagination)
  if not page then return fail(pg) end
  for i, dev in ipairs(page) do
    local v = view(dev, mode)
    if projection then
      local p = {}
      for _, f in ipairs(projection) do p[f] = v[f] end
      if mode then p.deviceSecret, p.sessionKey = v.deviceSecret, v.sessionKey end
      v = p
    end
    page[i] = v
  end
  return util.ok(util.list(page), pg)
end

-- The devices a parsed expression can name by the store's indexes (assetId in …, or one productKey and
-- deviceKey in …), or nil when it needs a scan.
local function indexed(conds)
  local by = {}
  for _, c in ipairs(conds) do by[c.field] = c.values end
  local list = {}
  if by.assetId then
    for aid in pairs(by.assetId) do list[#list + 1] = store.get(aid) end
  elseif by.productKey and by.deviceKey and next(by.productKey, next(by.productKey)) == nil then
    local pk = next(by.productKey)
    for key in pairs(by.deviceKey) do
      local id = store.find_key(pk, key)
      list[#list + 1] = id and store.get(id) or nil
    end
  else
    return nil
  end
  table.sort(list, store.by_creation)
  return list
end

local function do_search(version, app, org, body)
  local mode, err = secret_mode(version, app, body.requireSecret)
  if err then return fail(err) end
  if body.expression ~= nil and type(body.expression) ~= "string" then return fail(bad("expression must be a string")) end
  local f = faults.current() or {}
  -- a gateway may refuse a long expression (the length is not documented): faults.search_max_expression
  if f.search_max_expression and body.expression and #body.expression > f.search_max_expression then
    return fail(bad("expression is too long"))
  end
  local projection = body.projection
  if projection ~= nil then
    if type(projection) ~= "table" then return fail(bad("projection must be a list of field names")) end
    for _, name in ipairs(projection) do
      if type(name) ~= "string" then return fail(bad("projection must be a list of field names")) end
    end
  end
  local conds, perr = search.parse(body.expression)
  if not conds then return fail(bad("expression: " .. perr)) end
  -- a search index that lags writes (EnOS advises ~2 s): faults.search_lag_ms hides devices changed since
  local lag = f.search_lag_ms
  local hidden_after = lag and lag > 0 and util.now_ms() - lag
  local hits = {}
  for _, dev in ipairs(indexed(conds) or store.all()) do
    if dev.orgId == org and search.match(conds, dev) and not (hidden_after and (dev._changed or 0) > hidden_after) then
      hits[#hits + 1] = dev
    end
  end
  return reply_page(hits, body.pagination, mode, projection)
end

local function do_replace(version, app, org, args, body)
  local mode, err = secret_mode(version, app, body.requireSecret)
  if err then return fail(err) end
  local new_key = body.newDeviceKey
  if new_key == nil or new_key == "" then return fail(bad("newDeviceKey is required")) end
  if not M.valid_key(new_key) then return fail(bad("newDeviceKey " .. KEY_RULE)) end
  local dev
  dev, err = lookup(org, args)
  if not dev then return fail(err) end
  local aid = dev.assetId
  dev, err = store.locked(function()
    local d = store.get(aid)  -- re-read under the lock: a concurrent replace may have won
    if not d then return nil, { code = 99400, msg = NOT_FOUND } end
    if args.assetId == nil and d.deviceKey ~= args.deviceKey then return nil, { code = 99400, msg = NOT_FOUND } end
    if d.deviceKey == new_key then return nil, { code = 11704, msg = "DeviceKey is repetitive" } end
    if store.find_key(d.productKey, new_key) then return nil, { code = 11702, msg = "DeviceKey existed" } end
    local now = util.now_ms()
    store.drop_key(d.productKey, d.deviceKey)
    if d.status == "online" then d.lastOfflineTime = now end
    d.deviceKey = new_key
    d.deviceSecret = util.random_alnum(20)
    d.status = "inactive"
    d.activeTime = 0
    d._changed = now
    store.put(d)
    ngx.shared.enos_misc:delete("blk:" .. d.productKey .. "/" .. new_key)
    -- whether a replace keeps a sub-device's gateway link is undocumented: a knob plays the other answer
    local f = faults.current() or {}
    if f.replace_detaches_subdevice or conf.cfg.replace_detaches_subdevice then
      local gw = store.gateway_of(d.assetId)
      if gw then store.detach(gw, d.assetId) end
    end
    return d
  end)
  if not dev then return fail(err) end
  local v = view(dev, mode)
  return util.ok({ assetId = v.assetId, productKey = v.productKey, deviceKey = v.deviceKey,
    deviceSecret = v.deviceSecret, sessionKey = v.sessionKey })
end

-- Update Device (patch): timezone and deviceName are mandatory (the real platform's rule); deviceTags, when
-- given, replaces the whole tag map (a client reads and merges); values must be strings.
local function do_update(_, _, org, args, body)
  if type(body.timezone) ~= "string" or body.timezone == "" then return fail(bad("timezone is required")) end
  local name = body.deviceName
  if type(name) ~= "table" or type(name.defaultValue) ~= "string" then
    return fail(bad("deviceName {defaultValue, i18nValue} is required"))
  end
  if body.deviceTags ~= nil then
    if type(body.deviceTags) ~= "table" or body.deviceTags[1] ~= nil then return fail(bad("deviceTags must be a map")) end
    for k, v in pairs(body.deviceTags) do
      if type(k) ~= "string" or type(v) ~= "string" then return fail(bad("deviceTags values must be strings")) end
    end
  end
  if body.deviceAttributes ~= nil and type(body.deviceAttributes) ~= "table" then
    return fail(bad("deviceAttributes must be a map"))
  end
  if body.deviceDesc ~= nil and type(body.deviceDesc) ~= "string" then return fail(bad("deviceDesc must be a string")) end
  local dev, err = lookup(org, args)
  if not dev then return fail(err) end
  local aid = dev.assetId
  dev, err = store.locked(function()
    local d = store.get(aid)
    if not d then return nil, { code = 99400, msg = NOT_FOUND } end
    d.timezone = body.timezone
    d.deviceName = { defaultValue = name.defaultValue, i18nValue = type(name.i18nValue) == "table" and
      name.i18nValue or {} }
    if body.deviceTags ~= nil then d.deviceTags = body.deviceTags end
    if body.deviceAttributes ~= nil then d.deviceAttributes = body.deviceAttributes end
    if body.deviceDesc ~= nil then d.deviceDesc = body.deviceDesc end
    store.put(d)
    return d
  end)
  if not dev then return fail(err) end
  return util.ok(nil)
end

-- topology ---------------------------------------------------------------------------

local function do_add_sub(_, _, org, body)
  local gw, err = lookup(org, body.gateway)
  if not gw then return fail(err) end
  if gw.productType ~= "Gateway" then return fail(bad("gateway " .. gw.assetId .. " is not a gateway device")) end
  if type(body.subDevices) ~= "table" or #body.subDevices == 0 then return fail(bad("subDevices is required")) end
  local subs = {}
  for _, ident in ipairs(body.subDevices) do
    local sub
    sub, err = lookup(org, ident)
    if not sub then return fail(err) end
    if sub.assetId == gw.assetId then return fail(bad("a gateway cannot be its own sub-device")) end
    local cur = store.gateway_of(sub.assetId)
    if cur and cur ~= gw.assetId then return fail(bad("sub-device " .. sub.assetId .. " already has a gateway")) end
    subs[#subs + 1] = sub
  end
  store.locked(function()
    for _, sub in ipairs(subs) do store.attach(gw.assetId, sub.assetId) end
  end)
  local out = {}
  for _, s in ipairs(subs) do out[#out + 1] = { assetId = s.assetId, productKey = s.productKey, deviceKey = s.deviceKey } end
  return util.ok(out)
end

local function do_remove_sub(_, _, org, body)
  local gw, err = lookup(org, body.gateway)
  if not gw then return fail(err) end
  if type(body.subDevices) ~= "table" then return fail(bad("subDevices is required")) end
  local subs = {}
  for _, ident in ipairs(body.subDevices) do
    local sub
    sub, err = lookup(org, ident)
    if not sub then return fail(err) end
    subs[#subs + 1] = sub.assetId
  end
  store.locked(function()
    for _, a in ipairs(subs) do
      if store.gateway_of(a) == gw.assetId then store.detach(gw.assetId, a) end
    end
  end)
  return util.ok(nil)
end

local function do_search_sub(version, app, org, body)
  local mode, err = secret_mode(version, app, body.requireSecret)
  if err then return fail(err) end
  local gw
  gw, err = lookup(org, body.gateway)
  if not gw then return fail(err) end
  local list = {}
  for _, a in ipairs(store.subs_of(gw.assetId)) do
    local d = store.get(a)
    if d then list[#list + 1] = d end
  end
  return reply_page(list, body.pagination, mode)
end

local function do_get_gateway(_, _, org, args, body)
  local ident = args
  if args.assetId == nil and args.productKey == nil then ident = body.subDevice or body end
  local sub, err = lookup(org, ident)
  if not sub then return fail(err) end
  local gw = store.gateway_of(sub.assetId)
  local d = gw and store.get(gw)
  return util.ok(d and view(d, nil) or nil)
end

-- routing ---------------------------------------------------------------------------

-- action -> {method, handler, takes body}
local DEVICE_ACTIONS = {
  get = { "GET", function(v, app, org, args) return do_get(v, app, org, args) end },
  create = { "POST", function(v, app, org, _, body) return do_create(v, app, org, body) end },
  search = { "POST", function(v, app, org, _, body) return do_search(v, app, org, body) end },
  replaceDevice = { "POST", do_replace },
  update = { "POST", do_update },
}
local TOPO_ACTIONS = {
  addSubDevice = { "POST", function(v, app, org, _, body) return do_add_sub(v, app, org, body) end },
  removeSubDevice = { "POST", function(v, app, org, _, body) return do_remove_sub(v, app, org, body) end },
  searchSubDevice = { "POST", function(v, app, org, _, body) return do_search_sub(v, app, org, body) end },
  getGateway = { "ANY", do_get_gateway },
}

--- Resolve the action entry for a path; returns entry or nil.
function M.action(kind, action)
  local t = kind == "devices" and DEVICE_ACTIONS or TOPO_ACTIONS
  return t[action]
end

--- Run an authenticated business call.
function M.dispatch(entry, version, app, args)
  local method = ngx.req.get_method()
  if entry[1] ~= "ANY" and method ~= entry[1] then
    return util.gateway(405, "method " .. method .. " not allowed for this action")
  end
  local org = args.orgId
  if org == nil or org == "" or type(org) ~= "string" then return fail(bad("orgId is required")) end
  if not conf.orgs[org] then return fail({ code = 99400, msg = "Invalid arguments: orgId does not exist" }) end
  if app.orgs and not app.orgs[org] then
    return fail({ code = 99403, msg = "No permission: the application is not authorized in org " .. org })
  end
  local body = {}
  if method ~= "GET" then
    local b, err = util.body_json()
    if not b then return fail(bad(err)) end
    body = b
  end
  return entry[2](version, app, org, args, body)
end

-- device login ----------------------------------------------------------------------

function M.login(cert)
  if ngx.req.get_method() ~= "POST" then return util.gateway(405, "method not allowed") end
  local b = util.body_json()
  local lc = conf.cfg.login
  if not b then return util.send(400, { code = 400, msg = "body must be JSON" }) end
  local pk, dk, cid, ts, sign = b.productKey, b.deviceKey, b.clientId, b.timestamp, b.sign
  for _, v in ipairs { pk, dk, cid, ts, sign } do
    if v == nil or v == "" or (type(v) ~= "string" and type(v) ~= "number") then
      return util.send(400, { code = 400, msg = "productKey, deviceKey, clientId, timestamp and sign are required" })
    end
  end
  if type(ts) == "number" then ts = string.format("%.0f", ts) end
  local misc = ngx.shared.enos_misc
  local who = tostring(pk) .. "/" .. tostring(dk)
  local blocked_ttl = misc:ttl("blk:" .. who)
  if blocked_ttl then
    local wait = math.max(1, math.ceil(blocked_ttl))
    return util.send(429, { code = 429, msg = "device blocked: more than " .. lc.max_attempts ..
      " connections in " .. lc.window_s .. " s; retry after " .. wait .. " s" }, { ["Retry-After"] = tostring(wait) })
  end
  -- count this attempt in a sliding window
  local now = ngx.now()
  local hist = util.json.decode(misc:get("att:" .. who) or "[]") or {}
  local keep = {}
  for _, t in ipairs(hist) do if now - t < lc.window_s then keep[#keep + 1] = t end end
  keep[#keep + 1] = now
  misc:set("att:" .. who, util.json.encode(keep), lc.window_s)
  if #keep > lc.max_attempts then
    misc:set("blk:" .. who, true, lc.block_s)
    misc:delete("att:" .. who)
    return util.send(429, { code = 429, msg = "device blocked: more than " .. lc.max_attempts ..
      " connections in " .. lc.window_s .. " s; retry after " .. lc.block_s .. " s" },
      { ["Retry-After"] = tostring(lc.block_s) })
  end
  local refused = { code = 401, msg = "login refused: bad productKey, deviceKey or sign" }
  local aid = store.find_key(tostring(pk), tostring(dk))
  local dev = aid and store.get(aid)
  if not dev then return util.send(401, refused) end
  if cert and cert.cert_asset ~= aid then
    return util.send(401, { code = 401, msg = "login refused: the certificate is bound to another device" })
  end
  local expect = util.sha256_hex("clientId" .. cid .. "deviceKey" .. dk .. "productKey" .. pk ..
    "timestamp" .. ts .. dev.deviceSecret):upper()
  if sign ~= expect then return util.send(401, refused) end
  if dev.status == "disable" then return util.send(401, { code = 403, msg = "login refused: device disabled" }) end
  -- a sub-device logging in through its gateway's connection (combine.login): the gateway must be online and
  -- the device one of its sub-devices
  local via = b.gateway
  local gid
  if via ~= nil then
    if type(via) ~= "table" or type(via.productKey) ~= "string" or type(via.deviceKey) ~= "string" then
      return util.send(400, { code = 400, msg = "gateway must be {productKey, deviceKey}" })
    end
    local gname = via.productKey .. "/" .. via.deviceKey
    gid = store.find_key(via.productKey, via.deviceKey)
    local g = gid and store.get(gid)
    if not g or g.status ~= "online" then
      return util.send(401, { code = 401, msg = "login refused: gateway " .. gname .. " is not online" })
    end
    if store.gateway_of(aid) ~= gid then
      return util.send(401, { code = 401, msg = "login refused: device " .. who .. " is not a sub-device of gateway " ..
        gname })
    end
  end
  dev = store.locked(function()
    local d = store.get(aid)
    if not d or d.deviceKey ~= dk then return nil end
    local t = util.now_ms()
    if not d.activeTime or d.activeTime == 0 then d.activeTime = t end
    d.lastOnlineTime = t
    d.status = "online"
    store.put(d)
    return d
  end)
  if not dev then return util.send(401, refused) end
  if cert then ngx.ctx.raw_serials = true end
  return util.send(200, { code = 0, msg = "OK", data = { status = "online", assetId = dev.assetId, gateway = gid,
    certSN = cert and cert.cert_sn or nil } })
end

return M
