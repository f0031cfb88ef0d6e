--- Bulk reads: many devices in one Search Device call. A real gateway throttles each application by calls,
-- so reading a window of 100 devices in one call instead of 100 is what lets a fleet job go at the quota's
-- pace.
--
-- What comes back is trusted only as far as it matches: a device counts for a row only when its assetId (or
-- its productKey and deviceKey) is exactly the row's. A value that could break out of the expression's quotes
-- (EnOS expressions cannot escape a quote) is never put in one: that row is read alone with Get Device. A row
-- the search did not return gets one Get Device before it counts as not found, because a search index can lag
-- writes. When the platform refuses an expression (99400: too long, say) or a page comes back short of its
-- totalSize, the window is halved and read again.
-- @module enos.bulk
local errors = require "enos.errors"

local M = {}

--- Default window: values in one expression (at most 200: one page).
M.WINDOW = 100
--- The pattern of values that may be quoted in an expression (others are read alone with Get Device).
M.SAFE = "^[%w_%.%-]+$"
--- Default attempts of each read (`read_attempts`).
M.READ_ATTEMPTS = 4

local function safe(v) return type(v) == "string" and v:find(M.SAFE) ~= nil end

local function default_sleep(s)
  return require("enos.workflow").default_sleep(s)
end

--- Options: window, require_secret, projection (field names; nil: whole devices), read_attempts,
-- backoff_ms, max_retry_after, sleep(seconds), on_call(what) (counts: "search" | "get"),
-- search_only (no Get Device for the rows the search did not settle: their results are nil, for the caller to
-- read its own way), search = false (Get Device only: a row whose search read disagreed).
local function options(o)
  o = o or {}
  local window = o.window or M.WINDOW
  if type(window) ~= "number" or window < 1 or window > 200 or window % 1 ~= 0 then
    error("enos.bulk: window must be an integer 1-200", 3)
  end
  return {
    window = window, require_secret = o.require_secret or nil, projection = o.projection,
    read_attempts = o.read_attempts or M.READ_ATTEMPTS, backoff_ms = o.backoff_ms or 200,
    max_retry_after = o.max_retry_after or 300, sleep = o.sleep or default_sleep, on_call = o.on_call,
    search = o.search ~= false, search_only = o.search_only or nil,
  }
end

-- A read retried on what a retry can fix (throttling, a 5xx, a garbled reply), with backoff.
local function retried(o, what, fn)
  local attempt = 0
  while true do
    attempt = attempt + 1
    if o.on_call then o.on_call(what) end
    local r, e1 = fn()
    if r then return r, e1 end
    if not (errors.is(e1) and (e1.retryable or e1.kind == "protocol")) or attempt >= o.read_attempts then
      return nil, e1
    end
    local ms = math.min(10000, o.backoff_ms * 2 ^ (attempt - 1)) * (0.75 + 0.5 * math.random())
    if type(e1.retry_after) == "number" then ms = math.max(ms, math.min(e1.retry_after, o.max_retry_after) * 1000) end
    o.sleep(ms / 1000)
  end
end

local function is_refusal(e)
  return errors.is(e) and e.kind == "invalid_argument" and e.code == 99400
end

-- Reads one group's chunk (indexes into targets) with one Search Device; devices matched go to found[i].
-- Returns the indexes left unread (to be read alone) | nil, err for the whole chunk.
local function search_chunk(client, o, group, chunk, targets, found, stats)
  local values, pos = {}, {}
  for k, i in ipairs(chunk) do
    local v = group.field == "assetId" and targets[i].assetId or targets[i].deviceKey
    values[k] = "'" .. v .. "'"
    pos[v] = i
  end
  local expr = group.field == "assetId" and ("assetId in (" .. table.concat(values, ",") .. ")")
    or ("productKey = '" .. group.productKey .. "' and deviceKey in (" .. table.concat(values, ",") .. ")")
  local list, pg = retried(o, "search", function()
    return client:search_devices { expression = expr, pageNo = 1, pageSize = math.max(#chunk, 1), orgId = group.orgId,
      requireSecret = o.require_secret, projection = o.projection }
  end)
  local short = list and type(pg) == "table" and tonumber(pg.totalSize) and tonumber(pg.totalSize) > #list
  if not list or short then
    local err = not list and pg or nil
    if (short or is_refusal(err)) and #chunk > 1 then
      stats.halvings = stats.halvings + 1
      local half = math.floor(#chunk / 2)
      local a, b = {}, {}
      for k, i in ipairs(chunk) do if k <= half then a[#a + 1] = i else b[#b + 1] = i end end
      local left = {}
      for _, part in ipairs { a, b } do
        local l, perr = search_chunk(client, o, group, part, targets, found, stats)
        if not l then return nil, perr end
        for _, i in ipairs(l) do left[#left + 1] = i end
      end
      return left
    end
    if short or is_refusal(err) then return chunk end          -- one value refused: read it alone
    return nil, err
  end
  stats.searches = stats.searches + 1
  local claimed = {}
  for _, d in ipairs(list) do
    local key = group.field == "assetId" and d.assetId or d.deviceKey
    local i = type(key) == "string" and pos[key]
    -- exactly the device asked for: same asset (or same product and key), same org when the reply says
    if i and (group.field == "assetId" or d.productKey == group.productKey)
        and (d.orgId == nil or group.orgId == nil or d.orgId == group.orgId) then
      if claimed[i] then claimed[i] = "ambiguous" else claimed[i] = d end
    end
  end
  local left = {}
  for _, i in ipairs(chunk) do
    local d = claimed[i]
    if d and d ~= "ambiguous" then found[i] = d else left[#left + 1] = i end
  end
  return left
end

--- Reads the devices named by `targets` (each {assetId} or {productKey, deviceKey}, optional orgId).
-- Returns results (results[i] = {device = d} or {err = e}, e.kind "not_found" when the platform has no such
-- device; nil with search_only for a row the search did not settle) and stats {searches, gets, halvings, calls}.
function M.read(client, targets, opts)
  local o = options(opts)
  local stats = { searches = 0, gets = 0, halvings = 0, calls = 0 }
  local on_call = o.on_call
  o.on_call = function(what) stats.calls = stats.calls + 1 if on_call then on_call(what) end end
  -- groups: by org and by assetId or product; values that cannot be quoted are read alone
  local groups, order, alone = {}, {}, {}
  for i, t in ipairs(targets) do
    local gk, g
    if not o.search then
      gk = nil
    elseif t.assetId and safe(t.assetId) then
      gk = (t.orgId or "") .. "\0a"
      g = { field = "assetId", orgId = t.orgId }
    elseif not t.assetId and safe(t.productKey) and safe(t.deviceKey) then
      gk = (t.orgId or "") .. "\0p" .. t.productKey
      g = { field = "deviceKey", productKey = t.productKey, orgId = t.orgId }
    end
    if gk then
      if not groups[gk] then groups[gk] = g g.rows = {} order[#order + 1] = gk end
      local rows = groups[gk].rows
      rows[#rows + 1] = i
    else
      alone[#alone + 1] = i
    end
  end
  local found, results = {}, {}
  for _, gk in ipairs(order) do
    local g = groups[gk]
    for first = 1, #g.rows, o.window do
      local chunk = {}
      for k = first, math.min(first + o.window - 1, #g.rows) do chunk[#chunk + 1] = g.rows[k] end
      local left, err = search_chunk(client, o, g, chunk, targets, found, stats)
      if not left then
        for _, i in ipairs(chunk) do if not found[i] then results[i] = { err = err } end end
      else
        for _, i in ipairs(left) do alone[#alone + 1] = i end
      end
    end
  end
  for i, d in pairs(found) do results[i] = { device = d } end
  if o.search_only then return results, stats end
  table.sort(alone)
  for _, i in ipairs(alone) do
    local t = targets[i]
    local ident = t.assetId and { assetId = t.assetId } or { productKey = t.productKey, deviceKey = t.deviceKey }
    ident.orgId, ident.requireSecret = t.orgId, o.require_secret
    local d, err = retried(o, "get", function() return client:get_device(ident) end)
    stats.gets = stats.gets + 1
    if d and ((t.assetId and d.assetId ~= t.assetId) or
        (not t.assetId and (d.productKey ~= t.productKey or d.deviceKey ~= t.deviceKey))) then
      d, err = nil, errors.new("protocol", "the platform answered a read of one device with another (assetId " ..
        tostring(d.assetId) .. ")")
    end
    if d then results[i] = { device = d }
    else
      if errors.is(err) and (err.kind == "not_found" or is_refusal(err)) then
        err = errors.new("not_found", "device not found: " .. tostring(err.message), { code = err.code })
      end
      results[i] = { err = err }
    end
  end
  return results, stats
end

--- Which of `keys` (new device keys in one product) other devices hold now: in one Search Device a window.
-- Returns map key → the assetId holding it | nil, err. Keys that cannot be quoted are skipped (they fail the
-- plan check anyway: device keys are letters, digits, '-', '_' and '.').
function M.keys_taken(client, org, product, keys, opts)
  local o = options(opts)
  local taken = {}
  if not safe(product) then return taken end
  local on_call = o.on_call
  local stats = { searches = 0, halvings = 0 }
  local function one(chunk)
    local quoted = {}
    for k, v in ipairs(chunk) do quoted[k] = "'" .. v .. "'" end
    local expr = "productKey = '" .. product .. "' and deviceKey in (" .. table.concat(quoted, ",") .. ")"
    local list, pg = retried({ read_attempts = o.read_attempts, backoff_ms = o.backoff_ms, sleep = o.sleep,
      max_retry_after = o.max_retry_after, on_call = on_call }, "search", function()
      return client:search_devices { expression = expr, pageNo = 1, pageSize = math.max(#chunk, 1), orgId = org,
        projection = { "assetId", "productKey", "deviceKey" } }
    end)
    local short = list and type(pg) == "table" and tonumber(pg.totalSize) and tonumber(pg.totalSize) > #list
    if (short or (not list and is_refusal(pg))) and #chunk > 1 then
      stats.halvings = stats.halvings + 1
      local half = math.floor(#chunk / 2)
      local a, b = {}, {}
      for k, v in ipairs(chunk) do if k <= half then a[#a + 1] = v else b[#b + 1] = v end end
      local ok, err = one(a)
      if not ok then return nil, err end
      return one(b)
    end
    if not list then return nil, pg end
    stats.searches = stats.searches + 1
    local want = {}
    for _, v in ipairs(chunk) do want[v] = true end
    for _, d in ipairs(list) do
      if d.productKey == product and want[d.deviceKey] then taken[d.deviceKey] = d.assetId or "?" end
    end
    return true
  end
  local chunk = {}
  for _, k in ipairs(keys) do
    if safe(k) then chunk[#chunk + 1] = k end
    if #chunk == o.window then
      local ok, err = one(chunk)
      if not ok then return nil, err end
      chunk = {}
    end
  end
  if #chunk > 0 then
    local ok, err = one(chunk)
    if not ok then return nil, err end
  end
  return taken, stats
end

return M
