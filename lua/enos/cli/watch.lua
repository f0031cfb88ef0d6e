--- enos-replace watch: the replaced devices of a batch (its journal or results file) or of a plan, watched until
-- they are online.
-- @module enos.cli.watch
local fleet = require "enos.fleet"
local journal_mod = require "enos.journal"
local plan_mod = require "enos.plan"
local out = require "enos.cli.output"
local errors = require "enos.errors"

local M = {}

M.EXIT_TEXT = [[
Exit codes (watch):
   0  every device is online
   2  usage: the file names no device, a bad option
   3  configuration or authentication
   5  network or the platform unavailable
   7  the wait ended with devices not online (listed)]]

--- Adds the `watch` command to the parser.
function M.add_command(p, h)
  local w = p:command("watch", "Watch replaced devices come online: a batch's journal or results file, or a plan.")
  h.help_flag(w, "watch")
  w:argument("file", "A batch journal (its done rows), a results file (its replaced rows) or a plan (its rows' "
    .. "new keys).")
  w:group("Watch",
    w:option("--wait", "Stop after this many seconds (default 3600)."):argname("<s>"),
    w:option("--interval", "Seconds between polls (default 10)."):argname("<s>"),
    w:option("--by", "Count by this column of the plan or results file (e.g. site)."):argname("<column>"),
    w:option("--qps", "At most this many requests per second (default: no cap)."):argname("<r>"),
    w:flag("--json", "JSON Lines on stdout: one object a poll, the last one with \"final\": true.")
  )
  h.connection_options(w)
  w:epilog([[
Examples:
   # after a batch: until every replaced unit has logged in, at most 2 hours, by site
   enos-replace watch plan.csv.results.csv --by site --wait 7200

   # from the journal (also while the batch runs in another terminal), one poll a minute
   enos-replace watch plan.csv.journal --interval 60

One Search Device reads up to 200 devices; only the devices not yet seen online are read again.
]] .. "\n" .. M.EXIT_TEXT)
  return w
end

local DONE = { replaced = true, reconciled = true }

-- The devices a file names: {assetId | productKey+deviceKey, label, since} | nil, message.
local function devices_of(path, by)
  local f, err = io.open(path, "rb")
  if not f then return nil, "cannot read " .. path .. ": " .. tostring(err) end
  local first = f:read("*l") or ""
  f:close()
  local list = {}
  if first:match("^%s*{") and first:find('"t"%s*:%s*"batch"') then
    if by then return nil, "--by: a journal has no plan columns; watch the results file or the plan instead" end
    local st, jerr = journal_mod.read(path)
    if not st then return nil, jerr end
    for _, rec in pairs(st.by_key) do
      if rec.state == "done" or rec.state == "replaced" then      -- (replaced: a step after it is left)
        list[#list + 1] = { assetId = rec.assetId, productKey = rec.productKey, deviceKey = rec.newDeviceKey,
          since = rec.ts, line = tonumber(rec.line) or 0,
          gateway = type(rec.gateway) == "table" and rec.gateway.assetId or nil }
      end
    end
    table.sort(list, function(a, b) return a.line < b.line end)
    return list
  end
  local cols = plan_mod.split_csv(first:gsub("\r$", ""))
  local is_results = false
  for _, c in ipairs(cols) do if c == "outcome" then is_results = true end end
  if is_results then
    local at, seen = {}, {}
    for i, c in ipairs(cols) do at[c] = i end
    if by and not at[by] then return nil, ("--by: the results file has no column %s"):format(by) end
    local n = 0
    for line in io.lines(path) do
      n = n + 1
      if n > 1 and line ~= "" then
        local cells = plan_mod.split_csv((line:gsub("\r$", "")))
        local asset = cells[at.assetId]
        if DONE[cells[at.outcome]] and asset and asset ~= "" and not seen[asset] then
          seen[asset] = true
          local gw = at.gatewayAssetId and cells[at.gatewayAssetId]
          list[#list + 1] = { assetId = asset, label = by and cells[at[by]] or nil,
            gateway = gw ~= "" and gw or nil }
        end
      end
    end
    return list
  end
  local reader, rerr = plan_mod.open(path)
  if not reader then return nil, rerr end
  local has_by = false
  for row, e in reader:rows() do
    if row then
      local t = plan_mod.check_row(row.fields)
      if t then
        local label
        if by then
          label = row.fields[by] or (row.extra and row.extra[by])
          if label ~= nil then has_by = true end
        end
        local gw = row.extra and row.extra.gatewayAssetId
        if gw == "" or type(gw) ~= "string" then gw = nil end
        if t.assetId then list[#list + 1] = { assetId = t.assetId, orgId = t.orgId, label = label, gateway = gw }
        else list[#list + 1] = { productKey = t.productKey, deviceKey = t.newDeviceKey, orgId = t.orgId, label = label,
          gateway = gw } end
      end
    elseif e and e.fatal then reader:close() return nil, ("%s:%d: %s"):format(path, e.line, e.message) end
  end
  reader:close()
  if by and not has_by and #list > 0 then return nil, ("--by: the plan has no column %s"):format(by) end
  return list
end
M.devices_of = devices_of

local function name_of(d)
  return d.assetId or (tostring(d.productKey) .. "/" .. tostring(d.deviceKey))
end

local function fmt_s(s)
  if s >= 3600 then return string.format("%dh%02dm", math.floor(s / 3600), math.floor(s % 3600 / 60)) end
  if s >= 60 then return string.format("%dm%02ds", math.floor(s / 60), math.floor(s % 60)) end
  return string.format("%ds", math.floor(s))
end

-- "412/500 online  inactive 80, offline 8  oldest W0000017 waiting 12m03s  [site-1 100/100, site-2 …]"
local function line_of(s)
  local parts = {}
  for st, n in pairs(s.counts) do if st ~= "online" then parts[#parts + 1] = st .. " " .. n end end
  table.sort(parts)
  local text = ("%d/%d online"):format(s.online, s.total)
  if #parts > 0 then text = text .. "  " .. table.concat(parts, ", ") end
  if s.oldest then text = text .. ("  oldest %s waiting %s"):format(name_of(s.oldest.device), fmt_s(s.oldest.waiting)) end
  local labels = {}
  for l, c in pairs(s.by_label) do labels[#labels + 1] = ("%s %d/%d"):format(errors.clean(tostring(l)), c.online, c.total) end
  table.sort(labels)
  if #labels > 0 then text = text .. "  [" .. table.concat(labels, ", ") .. "]" end
  local fix = s.gateways_to_fix or {}
  if #fix > 0 then
    text = text .. ("  gateway %s online, %d sub-device(s) offline%s"):format(errors.clean(fix[1].gateway),
      fix[1].waiting, #fix > 1 and (" (+" .. (#fix - 1) .. " gateway(s))") or "")
  end
  return text
end

--- Runs the watch command; returns the exit code.
function M.run(c, args, h)
  local EXIT = h.EXIT
  local nums = {}
  for _, k in ipairs { "wait", "interval", "qps" } do
    if args[k] ~= nil then
      local n = tonumber(args[k])
      if not n or n < 0 or (k == "qps" and n == 0) then
        h.say(c, "--%s must be a %s number", k, k == "qps" and "positive" or "non-negative")
        return EXIT.usage
      end
      nums[k] = n
    end
  end
  local devices, derr = devices_of(args.file, args.by)
  if not devices then h.say(c, "%s", errors.clean(derr)) return EXIT.usage end
  if #devices == 0 then
    h.say(c, "%s names no replaced device to watch", args.file)
    return EXIT.usage
  end
  local client, code = h.make_client(c, args)
  if not client then return code end
  local term = c.getenv("TERM")
  local live = c.stderr_tty and not args.json and term ~= "dumb" and (c.getenv("NO_COLOR") or "") == ""
  local function on_poll(s)
    if args.json then
      c.out(out.json { poll = s.poll, total = s.total, online = s.online, counts = s.counts, by_label = s.by_label,
        oldest = s.oldest and { device = name_of(s.oldest.device), waiting = s.oldest.waiting } or nil,
        elapsed = s.elapsed, calls = s.calls, final = s.final or false, outcome = s.outcome,
        gateways_to_fix = #(s.gateways_to_fix or {}) > 0 and s.gateways_to_fix or nil } .. "\n")
    elseif live then
      c.err("\r\27[K" .. line_of(s) .. (s.final and "\n" or ""))
    else
      c.err(line_of(s) .. "\n")
    end
  end
  local r, err = fleet.watch(client, devices, { timeout = nums.wait, interval = nums.interval, qps = nums.qps,
    on_poll = on_poll, sleep = c.sleep })
  client:close()
  if not r then
    local k = err.kind
    return h.report_error(c, args, err, k == "invalid_argument" and EXIT.usage or
      ((k == "config" or k == "auth") and EXIT.config or EXIT.network))
  end
  if r.outcome == "online" then
    if not args.json then h.say(c, "all %d device(s) online after %s (%d calls)", r.total, fmt_s(r.elapsed), r.calls) end
    return EXIT.ok
  end
  if not args.json then
    local missing = {}
    for _, d in ipairs(r.devices) do
      if d.status ~= "online" and #missing < 50 then missing[#missing + 1] = name_of(d.device) .. " (" .. d.status .. ")" end
    end
    h.say(c, "%d of %d device(s) not online after %s: %s%s", r.total - r.online, r.total, fmt_s(r.elapsed),
      table.concat(missing, ", "), r.total - r.online > #missing and ", …" or "")
    for _, f in ipairs(r.gateways_to_fix or {}) do
      h.say(c, "gateway %s is online but %d of its replaced sub-device(s) are not: configure their new triples on " ..
        "it (the batch's per-gateway file CREDS.gateway-%s.csv)", errors.clean(f.gateway), f.waiting,
        errors.clean(f.gateway))
    end
  end
  return EXIT.not_online
end

return M
