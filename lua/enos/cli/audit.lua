--- enos-replace audit: the devices replaced but not online since, with their age, from batch journals and
-- (--platform) from the platform's stamped devices.
-- @module enos.cli.audit
local fleet = require "enos.fleet"
local journal_mod = require "enos.journal"
local out = require "enos.cli.output"
local errors = require "enos.errors"

local M = {}

M.EXIT_TEXT = [[
Exit codes (audit):
   0  every device replaced has come online since
   2  usage: a file that is not a journal, a bad option
   3  configuration or authentication
   5  network or the platform unavailable
   7  some devices have not come online since their replace (listed)]]

--- Adds the `audit` command to the parser.
function M.add_command(p, h)
  local a = p:command("audit", "List the devices replaced but not online since, with their age: from batch journals "
    .. "and, with --platform, from the platform's devices tagged replacedAt (--stamp).")
  h.help_flag(a, "audit")
  a:argument("journal", "Batch journals (their done rows)."):args("*")
  a:group("Audit",
    a:flag("--platform", "Also search the platform: inactive devices with the replacedAt tag (one call a page of 200)."),
    a:option("--min-age", "Only devices replaced at least this many seconds ago."):argname("<s>"),
    a:flag("--json", "JSON Lines on stdout: one object a device.")
  )
  h.connection_options(a)
  a:epilog([[
Examples:
   # a week after a partial rollout: which units were never installed?
   enos-replace audit site-north.csv.journal site-south.csv.journal --min-age 86400

   # everything the platform shows as stamped by --stamp and never activated since
   enos-replace audit --platform

A device counts as not online since its replace while its activeTime is 0 (the replace resets it; the new
unit's first login sets it). Devices read in bulk: one Search Device per 200.
]] .. "\n" .. M.EXIT_TEXT)
  return a
end

-- The done (or replaced) rows of a journal: devices for fleet.audit | nil, message.
local function devices_of(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, "cannot read " .. path .. ": " .. tostring(err) end
  local first = f:read("*l") or ""
  f:close()
  if not (first:match("^%s*{") and first:find('"t"%s*:%s*"batch"')) then
    return nil, path .. " is not a batch journal (its first line is not the batch header)"
  end
  local st, jerr = journal_mod.read(path)
  if not st then return nil, jerr end
  local list = {}
  for _, rec in pairs(st.by_key) do
    if (rec.state == "done" or rec.state == "replaced") and rec.assetId then
      list[#list + 1] = { assetId = rec.assetId, since = rec.ts, source = path, line = tonumber(rec.line) or 0,
        gateway = type(rec.gateway) == "table" and rec.gateway.assetId or nil }
    end
  end
  table.sort(list, function(a, b) return a.line < b.line end)
  return list
end
M.devices_of = devices_of

local function fmt_age(s)
  if not s then return "?" end
  if s >= 86400 then return string.format("%dd%02dh", math.floor(s / 86400), math.floor(s % 86400 / 3600)) end
  if s >= 3600 then return string.format("%dh%02dm", math.floor(s / 3600), math.floor(s % 3600 / 60)) end
  if s >= 60 then return string.format("%dm%02ds", math.floor(s / 60), math.floor(s % 60)) end
  return string.format("%ds", math.floor(s))
end

--- Runs the audit command; returns the exit code.
function M.run(c, args, h)
  local EXIT = h.EXIT
  local min_age
  if args.min_age ~= nil then
    min_age = tonumber(args.min_age)
    if not min_age or min_age < 0 then h.say(c, "--min-age must be a number of seconds >= 0") return EXIT.usage end
  end
  local files = args.journal or {}
  if #files == 0 and not args.platform then
    h.say(c, "give batch journals to audit, or --platform (or both)")
    return EXIT.usage
  end
  local devices, seen = {}, {}
  for _, path in ipairs(files) do
    local list, derr = devices_of(path)
    if not list then h.say(c, "%s", errors.clean(derr)) return EXIT.usage end
    for _, d in ipairs(list) do
      if not seen[d.assetId] then seen[d.assetId] = true devices[#devices + 1] = d end
    end
  end
  if #devices == 0 and not args.platform then
    h.say(c, "the journal(s) name no replaced device")
    return EXIT.usage
  end
  local client, code = h.make_client(c, args)
  if not client then return code end
  local r, err = fleet.audit(client, devices, { platform = args.platform, min_age = min_age, sleep = c.sleep })
  client:close()
  if not r then
    local k = err.kind
    return h.report_error(c, args, err, k == "invalid_argument" and EXIT.usage or
      ((k == "config" or k == "auth" or k == "permission") and EXIT.config or EXIT.network))
  end
  local row = "%-12s %-16s %-24s %-9s %9s  %s%s\n"
  if not args.json and #r.pending > 0 then
    c.out(row:format("assetId", "productKey", "deviceKey", "status", "age", "source", ""))
  end
  for _, p in ipairs(r.pending) do
    if args.json then
      c.out(out.json { assetId = p.assetId, productKey = p.productKey, deviceKey = p.deviceKey, status = p.status,
        replaced_ms = p.since, age = p.age and math.floor(p.age) or nil, source = p.source, gateway = p.gateway } .. "\n")
    else
      c.out(row:format(errors.clean(tostring(p.assetId)),
        errors.clean(tostring(p.productKey)), errors.clean(tostring(p.deviceKey)), tostring(p.status),
        fmt_age(p.age), errors.clean(tostring(p.source)), p.gateway and ("  behind gateway " .. errors.clean(p.gateway)) or ""))
    end
  end
  if not args.json then
    h.say(c, "%d device(s) replaced and not online since (%d from journals checked%s; %d call(s))", #r.pending,
      r.checked, args.platform and ", plus the platform's stamped devices" or "", r.calls)
  end
  return #r.pending == 0 and EXIT.ok or EXIT.not_online
end

return M
