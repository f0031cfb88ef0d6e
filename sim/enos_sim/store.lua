-- Device state in lua_shared_dict "enos_state", shared by all nginx workers.
--   d:<assetId>                  -> device (JSON, with the clear deviceSecret)
--   k:<productKey>/<deviceKey>   -> assetId (uniqueness of deviceKey within a product)
--   g:<subAssetId>               -> gateway assetId
--   s:<gatewayAssetId>           -> JSON list of sub-device assetIds
-- Writers serialise on a mutex made of shdict:add (resty.lock is not available on Debian).
local util = require "enos_sim.util"
local cjson = util.json

local M = {}

local state = ngx.shared.enos_state
local misc = ngx.shared.enos_misc

M.state_file = nil  -- set by server.init from the config

function M.get(asset_id)
  local s = state:get("d:" .. asset_id)
  if not s then return nil end
  return cjson.decode(s)
end

function M.find_key(product_key, device_key)
  return state:get("k:" .. product_key .. "/" .. device_key)
end

function M.put(dev)
  local ok, err = state:set("d:" .. dev.assetId, cjson.encode(dev))
  if not ok then error("enos_state full: " .. tostring(err)) end
  state:set("k:" .. dev.productKey .. "/" .. dev.deviceKey, dev.assetId)
end

function M.drop_key(product_key, device_key)
  state:delete("k:" .. product_key .. "/" .. device_key)
end

--- The order of listings: by createTime, then assetId (stable pagination).
function M.by_creation(a, b)
  if a.createTime ~= b.createTime then return (a.createTime or 0) < (b.createTime or 0) end
  return a.assetId < b.assetId
end

--- Every device, sorted by createTime then assetId (stable pagination).
function M.all()
  local list = {}
  for _, k in ipairs(state:get_keys(0)) do
    if k:sub(1, 2) == "d:" then
      local s = state:get(k)
      if s then list[#list + 1] = cjson.decode(s) end
    end
  end
  table.sort(list, M.by_creation)
  return list
end

function M.count_product(product_key)
  local n, prefix = 0, "k:" .. product_key .. "/"
  for _, k in ipairs(state:get_keys(0)) do
    if k:sub(1, #prefix) == prefix then n = n + 1 end
  end
  return n
end

function M.new_asset_id()
  for _ = 1, 100 do
    local id = util.random_alnum(8)
    if not state:get("d:" .. id) then return id end
  end
  error("cannot allocate an assetId")
end

-- topology ----------------------------------------------------------------

function M.gateway_of(sub)
  return state:get("g:" .. sub)
end

function M.subs_of(gw)
  local s = state:get("s:" .. gw)
  return s and cjson.decode(s) or {}
end

function M.attach(gw, sub)
  local subs = M.subs_of(gw)
  for _, a in ipairs(subs) do if a == sub then return end end
  subs[#subs + 1] = sub
  state:set("s:" .. gw, cjson.encode(subs))
  state:set("g:" .. sub, gw)
end

function M.detach(gw, sub)
  local subs, keep = M.subs_of(gw), {}
  for _, a in ipairs(subs) do if a ~= sub then keep[#keep + 1] = a end end
  if #keep == 0 then state:delete("s:" .. gw) else state:set("s:" .. gw, cjson.encode(keep)) end
  state:delete("g:" .. sub)
end

-- mutex -------------------------------------------------------------------

local function finish(ok, ...)
  if ok then
    local saved, err = M.save()
    misc:delete("lock:state")
    if not saved then ngx.log(ngx.ERR, "enos-sim: state not saved: ", err) end
    return ...
  end
  misc:delete("lock:state")
  error((...), 0)
end

--- Run fn() while holding the global write lock; returns fn's results. Saves state afterwards.
function M.locked(fn, ...)
  local deadline = ngx.now() + 5
  while true do
    local ok, err = misc:add("lock:state", ngx.worker.pid(), 5)
    if ok then break end
    if err ~= "exists" then error("lock: " .. tostring(err)) end
    if ngx.now() > deadline then error("lock: timeout") end
    ngx.sleep(0.001)
    ngx.update_time()
  end
  return finish(pcall(fn, ...))
end

-- persistence -------------------------------------------------------------

--- Write every state entry to the --state file (atomically: temp file + rename).
function M.save()
  local path = M.state_file
  if not path then return true end
  local entries = {}
  for _, k in ipairs(state:get_keys(0)) do
    local v = state:get(k)
    if v ~= nil then entries[k] = v end
  end
  local tmp = path .. ".tmp"
  local f, err = io.open(tmp, "wb")
  if not f then ngx.log(ngx.ERR, "enos-sim: cannot save state: ", err); return nil, err end
  f:write(cjson.encode({ version = 1, entries = entries }))
  f:close()
  local ok, rerr = os.rename(tmp, path)
  if not ok then ngx.log(ngx.ERR, "enos-sim: cannot save state: ", rerr); return nil, rerr end
  return true
end

--- Load the state file into the dict; false when there is no file.
function M.load(path)
  local f = io.open(path, "rb")
  if not f then return false end
  local s = f:read("*a")
  f:close()
  local t = cjson.decode(s)
  if type(t) ~= "table" or type(t.entries) ~= "table" then
    error("enos-sim: state file " .. path .. " is not valid")
  end
  state:flush_all()
  for k, v in pairs(t.entries) do state:set(k, v) end
  return true
end

function M.clear()
  state:flush_all()
  state:flush_expired()
end

return M
