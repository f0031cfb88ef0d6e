--- Watching a replaced fleet come online. A replace resets a device to `inactive`; the field job ends when
-- the new unit has logged in with its new triple. The watch polls the devices' status in bulk (one Search
-- Device per up to 200 devices a poll, with a projection), polls only the devices not yet seen online, and
-- stops when every device is online or the time is up.
-- @module enos.fleet
local bulk = require "enos.bulk"
local errors = require "enos.errors"
local core = require "enos.core"

local M = {}

--- The fields a poll asks for (Search Device `projection`).
M.PROJECTION = { "assetId", "productKey", "deviceKey", "status", "activeTime" }

--- Defaults: interval (seconds between polls), timeout (seconds), window (devices per Search Device, 1-200).
M.DEFAULTS = { interval = 10, timeout = 3600, window = 200 }

local function default_sleep(s) return require("enos.workflow").default_sleep(s) end

-- the target a device is read by: its assetId, else its product and (new) key
local function target_of(d)
  if d.assetId and d.assetId ~= "" then return { assetId = d.assetId, orgId = d.orgId } end
  return { productKey = d.productKey, deviceKey = d.deviceKey, orgId = d.orgId }
end

local function check_devices(devices)
  if type(devices) ~= "table" then return "devices must be a list" end
  if #devices == 0 then return "no devices to watch" end
  for i, d in ipairs(devices) do
    if type(d) ~= "table" then return ("devices[%d] is not a table"):format(i) end
    local by_asset = type(d.assetId) == "string" and d.assetId ~= ""
    local by_key = type(d.productKey) == "string" and d.productKey ~= "" and type(d.deviceKey) == "string"
      and d.deviceKey ~= ""
    if not (by_asset or by_key) then
      return ("devices[%d] needs assetId, or productKey and deviceKey (its new key)"):format(i)
    end
  end
end

-- The summary of a poll: {poll, total, online, counts = {status → n}, by_label = {label → {total, online}},
-- oldest = {device, waiting (s)} (the device not yet online that has waited longest), elapsed (s), calls,
-- final, outcome ("online" | "timeout" while final, else nil)}. now: the watch's clock, in ms.
local function summary(state, now)
  local counts, by_label = {}, {}
  local oldest
  for _, d in ipairs(state.devices) do
    local st = d.status or "unknown"
    counts[st] = (counts[st] or 0) + 1
    if d.label ~= nil then
      local l = by_label[d.label]
      if not l then l = { total = 0, online = 0 } by_label[d.label] = l end
      l.total = l.total + 1
      if st == "online" then l.online = l.online + 1 end
    end
    if st ~= "online" and (not oldest or d.since < oldest.since) then oldest = d end
  end
  -- sub-devices not online behind a gateway that is: the gateway's local configuration lacks the new triple
  local fix, fix_list = {}, {}
  for _, d in ipairs(state.devices) do
    local g = d.gateway and state.gateways[d.gateway]
    if g and d.status ~= "online" and g.status == "online" then
      local f = fix[d.gateway]
      if not f then
        f = { gateway = d.gateway, status = g.status, waiting = 0 }
        fix[d.gateway] = f
        fix_list[#fix_list + 1] = f
      end
      f.waiting = f.waiting + 1
    end
  end
  table.sort(fix_list, function(a, b) return a.gateway < b.gateway end)
  return { poll = state.polls, total = #state.devices, online = state.online, counts = counts, by_label = by_label,
    oldest = oldest and { device = oldest.device, waiting = math.max(0, (now - oldest.since) / 1000) } or nil,
    elapsed = (now - state.t0) / 1000, calls = state.calls, gateways_to_fix = fix_list }
end

--- Watches `devices` until every one is online or `opts.timeout` seconds have passed.
-- Each device: `{assetId=}` or `{productKey=, deviceKey=}` (the new key), optional `orgId`, `label` (a group,
-- e.g. the plan's site), `since` (ms: when it was replaced; default the watch's start) and `gateway` (the assetId
-- of the gateway a sub-device connects through: its status is read in the same calls, and a sub-device not online
-- behind an online gateway is reported in `gateways_to_fix`: that gateway's configuration needs the new triple).
-- A device seen online counts as online from then on, and is not polled again.
-- @param client an `enos.client`
-- @tparam table devices the list
-- @tparam[opt] table opts interval (s, default 10), timeout (s, default 3600), window (1-200), qps (requests a
-- second at most), on_poll (function(summary), after each poll: {poll, total, online, counts = {status → n},
-- by_label = {label → {total, online}}, oldest = {device, waiting (s)}, elapsed (s), calls, final, outcome,
-- gateways_to_fix = {{gateway (assetId), status, waiting (sub-devices not online)}…}}),
-- sleep (function(seconds)), clock (function() -> ms), read_attempts, max_retry_after
-- @return report {outcome = "online" | "timeout", polls, calls, elapsed, total, online, counts, by_label,
-- oldest, devices = {{device, status, label}…}} | nil, err (bad input, before any request; or an error every
-- poll would repeat: `auth`, `config`, `permission`)
function M.watch(client, devices, opts)
  if type(client) ~= "table" then error("enos.fleet.watch: client expected", 2) end
  opts = opts or {}
  if type(opts) ~= "table" then error("enos.fleet.watch: opts must be a table", 2) end
  local bad = check_devices(devices)
  if bad then return nil, errors.arg("devices", bad) end
  local interval = opts.interval or M.DEFAULTS.interval
  local timeout = opts.timeout or M.DEFAULTS.timeout
  local window = opts.window or M.DEFAULTS.window
  for k, v in pairs { interval = interval, timeout = timeout } do
    if type(v) ~= "number" or v < 0 or v ~= v then return nil, errors.arg(k, k .. " must be a number >= 0") end
  end
  if type(window) ~= "number" or window < 1 or window > 200 or window % 1 ~= 0 then
    return nil, errors.arg("window", "window must be an integer 1-200")
  end
  if opts.qps ~= nil and (type(opts.qps) ~= "number" or opts.qps <= 0) then
    return nil, errors.arg("qps", "qps must be a positive number")
  end
  local sleep = opts.sleep or default_sleep
  local clock = opts.clock or core.monotonic_ms
  local wall = core.now_ms
  local t0 = clock()
  local wall0 = wall()
  local state = { devices = {}, polls = 0, calls = 0, online = 0, t0 = t0, gateways = {} }
  for i, d in ipairs(devices) do
    -- (since: a wall-clock ms from the caller, kept on the watch's clock)
    local since = type(d.since) == "number" and (t0 - math.max(0, wall0 - d.since)) or t0
    local gw = type(d.gateway) == "table" and d.gateway.assetId or d.gateway
    if gw ~= nil and (type(gw) ~= "string" or gw == "") then
      return nil, errors.arg("devices", ("devices[%d].gateway must be a gateway's assetId"):format(i))
    end
    if gw and not state.gateways[gw] then state.gateways[gw] = { device = { assetId = gw, orgId = d.orgId } } end
    state.devices[i] = { device = target_of(d), label = d.label, since = since, gateway = gw }
  end

  -- the rate cap: calls spaced 1/qps apart
  local gap = opts.qps and 1000 / opts.qps or 0
  local last_call
  local function on_call()
    if gap > 0 and last_call then
      local wait = last_call + gap - clock()
      if wait > 0 then sleep(wait / 1000) end
    end
    last_call = clock()
    state.calls = state.calls + 1
  end
  local bopts = { window = window, projection = M.PROJECTION, search_only = true, sleep = sleep,
    read_attempts = opts.read_attempts, max_retry_after = opts.max_retry_after, on_call = on_call }

  while true do
    local pending, targets, gws = {}, {}, {}
    for _, d in ipairs(state.devices) do
      if d.status ~= "online" then
        pending[#pending + 1] = d targets[#targets + 1] = d.device
        local g = d.gateway and state.gateways[d.gateway]
        if g and not g.asked then g.asked = true gws[#gws + 1] = g end
      end
    end
    -- the gateways of the sub-devices still waiting, read in the same calls
    for _, g in ipairs(gws) do g.asked = nil targets[#targets + 1] = g.device end
    local results = bulk.read(client, targets, bopts)
    for k, g in ipairs(gws) do
      local r = results[#pending + k]
      g.status = r and r.device and r.device.status or "unknown"
    end
    state.polls = state.polls + 1
    for k, d in ipairs(pending) do
      local r = results[k]
      if r and r.device then
        d.status = r.device.status or "unknown"
        if d.status == "online" then state.online = state.online + 1 end
      elseif r and r.err then
        local e = r.err
        if e.kind == "auth" or e.kind == "config" or e.kind == "permission" then return nil, e end
        d.status = d.status or "unknown"
      else
        d.status = "missing"          -- (the search did not return it: not found, or the index lags)
      end
    end
    local now = clock()
    local s = summary(state, now)
    local all = state.online == #state.devices
    local out_of_time = s.elapsed >= timeout
    if all or out_of_time then
      s.final, s.outcome = true, all and "online" or "timeout"
      if opts.on_poll then opts.on_poll(s) end
      local list = {}
      for i, d in ipairs(state.devices) do
        local g = d.gateway and state.gateways[d.gateway]
        list[i] = { device = d.device, status = d.status, label = d.label, gateway = d.gateway,
          gateway_status = g and g.status or nil }
      end
      s.polls, s.devices = state.polls, list
      return s
    end
    if opts.on_poll then opts.on_poll(s) end
    sleep(math.min(interval, math.max(0, timeout - s.elapsed)))
  end
end

--- The fields an audit reads of each device.
M.AUDIT_PROJECTION = { "assetId", "productKey", "deviceKey", "status", "activeTime", "deviceTags" }

local function age_of(since_ms, now_ms)
  if type(since_ms) ~= "number" then return nil end
  return math.max(0, (now_ms - since_ms) / 1000)
end

-- ISO 8601 UTC (2026-12-03T10:00:00Z) → epoch ms, or nil
local function parse_iso(v)
  if type(v) ~= "string" then return nil end
  local y, mo, d, h, mi, sec = v:match("^(%d%d%d%d)-(%d%d)-(%d%d)T(%d%d):(%d%d):(%d%d)")
  if not y then return nil end
  -- days from the civil date (no os.time: it reads the local time zone)
  y, mo = tonumber(y), tonumber(mo)
  if mo <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (mo + 9) % 12
  local doy = math.floor((153 * mp + 2) / 5) + tonumber(d) - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  local days = era * 146097 + doe - 719468
  return ((days * 24 + tonumber(h)) * 60 + tonumber(mi)) * 60000 + tonumber(sec) * 1000
end
M._parse_iso = parse_iso

--- The replaced devices that have not come online since their replace, with their age.
-- `devices` as for `watch` (each with `since`, the replace's time in wall-clock ms, and optionally `source`,
-- `gateway`), read in bulk (one Search Device per up to 200); with `opts.platform`, also every device the
-- platform shows `inactive` with the `replacedAt` tag (`--stamp`), found by Search Device `status = 'inactive' and
-- deviceTags.replacedAt exists`, a page of 200 at a time.
-- A device is pending when its `activeTime` is 0 (a replace resets it; the new unit's first login sets it).
-- @param client an `enos.client`
-- @tparam table devices the list (may be empty with `opts.platform`)
-- @tparam[opt] table opts platform (boolean), min_age (seconds: older ones only), window, read_attempts, sleep,
-- max_retry_after, now (ms, wall clock)
-- @return {pending = {{assetId, productKey, deviceKey, status, since, age (s), source, gateway}…}, checked, calls}
-- | nil, err
function M.audit(client, devices, opts)
  if type(client) ~= "table" then error("enos.fleet.audit: client expected", 2) end
  opts = opts or {}
  if type(devices) ~= "table" then return nil, errors.arg("devices", "devices must be a list") end
  if #devices > 0 then
    local bad = check_devices(devices)
    if bad then return nil, errors.arg("devices", bad) end
  elseif not opts.platform then
    return nil, errors.arg("devices", "no devices to audit (give journals, or ask the platform)")
  end
  local now = opts.now or core.now_ms()
  local min_age = opts.min_age or 0
  local calls = 0
  local bopts = { window = opts.window or 200, projection = M.AUDIT_PROJECTION, search_only = true,
    sleep = opts.sleep, read_attempts = opts.read_attempts, max_retry_after = opts.max_retry_after,
    on_call = function() calls = calls + 1 end }
  local out, seen = {}, {}
  local function add(r, since, source, gateway)
    local age = age_of(since, now)
    if age and age < min_age then return end
    seen[r.assetId] = true
    out[#out + 1] = { assetId = r.assetId, productKey = r.productKey, deviceKey = r.deviceKey, status = r.status,
      since = since, age = age, source = source, gateway = gateway }
  end
  if #devices > 0 then
    local targets = {}
    for i, d in ipairs(devices) do targets[i] = target_of(d) end
    local results = bulk.read(client, targets, bopts)
    for i, d in ipairs(devices) do
      local r = results[i]
      if r and r.err and (r.err.kind == "auth" or r.err.kind == "config" or r.err.kind == "permission") then
        return nil, r.err
      end
      local dev = r and r.device
      if dev and not seen[dev.assetId] and (tonumber(dev.activeTime) or 0) == 0 and dev.status ~= "online" then
        add(dev, d.since, d.source, type(d.gateway) == "table" and d.gateway.assetId or d.gateway)
      elseif not dev then
        -- not found (deleted since, or replaced again elsewhere): said, not hidden
        local t = targets[i]
        out[#out + 1] = { assetId = t.assetId, productKey = t.productKey, deviceKey = t.deviceKey, status = "missing",
          since = d.since, age = age_of(d.since, now), source = d.source }
      end
    end
  end
  if opts.platform then
    local page = 1
    while true do
      calls = calls + 1
      local list, pg = client:search_devices { expression = "status = 'inactive' and deviceTags.replacedAt exists",
        pageNo = page, pageSize = 200, projection = M.AUDIT_PROJECTION }
      if not list then return nil, pg end
      for _, dev in ipairs(list) do
        if not seen[dev.assetId] and (tonumber(dev.activeTime) or 0) == 0 then
          local tags = type(dev.deviceTags) == "table" and dev.deviceTags or {}
          add(dev, parse_iso(tags.replacedAt), "platform")
        end
      end
      local total = type(pg) == "table" and tonumber(pg.totalSize)
      if #list < 200 or not total or page * 200 >= total then break end
      page = page + 1
    end
  end
  table.sort(out, function(a, b) return (a.age or -1) > (b.age or -1) end)
  return { pending = out, checked = #devices, calls = calls }
end

return M
