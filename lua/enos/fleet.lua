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
  return { poll = state.polls, total = #state.devices, online = state.online, counts = counts, by_label = by_label,
    oldest = oldest and { device = oldest.device, waiting = math.max(0, (now - oldest.since) / 1000) } or nil,
    elapsed = (now - state.t0) / 1000, calls = state.calls }
end

--- Watches `devices` until every one is online or `opts.timeout` seconds have passed.
-- Each device: `{assetId=}` or `{productKey=, deviceKey=}` (the new key), optional `orgId`, `label` (a group,
-- e.g. the plan's site) and `since` (ms: when it was replaced; default the watch's start).
-- A device seen online counts as online from then on, and is not polled again.
-- @param client an `enos.client`
-- @tparam table devices the list
-- @tparam[opt] table opts interval (s, default 10), timeout (s, default 3600), window (1-200), qps (requests a
-- second at most), on_poll (function(summary), after each poll: {poll, total, online, counts = {status → n},
-- by_label = {label → {total, online}}, oldest = {device, waiting (s)}, elapsed (s), calls, final, outcome}),
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
  local state = { devices = {}, polls = 0, calls = 0, online = 0, t0 = t0 }
  for i, d in ipairs(devices) do
    -- (since: a wall-clock ms from the caller, kept on the watch's clock)
    local since = type(d.since) == "number" and (t0 - math.max(0, wall0 - d.since)) or t0
    state.devices[i] = { device = target_of(d), label = d.label, since = since }
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
    local pending, targets = {}, {}
    for _, d in ipairs(state.devices) do
      if d.status ~= "online" then pending[#pending + 1] = d targets[#targets + 1] = d.device end
    end
    local results = bulk.read(client, targets, bopts)
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
      for i, d in ipairs(state.devices) do list[i] = { device = d.device, status = d.status, label = d.label } end
      s.polls, s.devices = state.polls, list
      return s
    end
    if opts.on_poll then opts.on_poll(s) end
    sleep(math.min(interval, math.max(0, timeout - s.elapsed)))
  end
end

return M
