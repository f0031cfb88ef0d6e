--- Output of enos-replace: a small ordered JSON encoder and the views of reports and devices.
-- Nothing here prints a secret unless asked to (`show_secret`).
-- @module enos.cli.output
local cjson = require "cjson"
local workflow = require "enos.workflow"


-- What the platform sent, printed as data: control characters shown as \xNN, never sent to the terminal raw.
local function clean(v) return require("enos.errors").clean(tostring(v), 4096) end

local M = {}

-- ---------------------------------------------------------------- JSON

-- cjson writes "/" as "\/"; valid but noisy for paths and URLs. A "\/" pair in its output is always
-- an escaped slash (a backslash itself comes out as "\\"), so undoing it is safe.
local function jstr(v) return (cjson.encode(v):gsub("\\/", "/")) end
M.jstr = jstr

local ARRAY = {}
--- Marks a table as a JSON array (so an empty one encodes as []).
function M.array(t) return setmetatable(t or {}, ARRAY) end

local function is_array(t)
  if getmetatable(t) == ARRAY then return true end
  local n = 0
  for _ in pairs(t) do n = n + 1 end
  return n > 0 and n == #t
end

local function encode(v, indent, out)
  local tv = type(v)
  if tv == "table" then
    local pad = indent and ("\n" .. string.rep("  ", indent + 1)) or ""
    local close = indent and ("\n" .. string.rep("  ", indent)) or ""
    local sep = indent and ": " or ":"
    local nxt = indent and indent + 1
    if is_array(v) then
      if #v == 0 then out[#out + 1] = "[]" return end
      out[#out + 1] = "["
      for i, x in ipairs(v) do
        if i > 1 then out[#out + 1] = "," end
        out[#out + 1] = pad
        encode(x, nxt, out)
      end
      out[#out + 1] = close .. "]"
      return
    end
    local keys = {}
    for k in pairs(v) do keys[#keys + 1] = tostring(k) end
    table.sort(keys)
    if #keys == 0 then out[#out + 1] = "{}" return end
    out[#out + 1] = "{"
    for i, k in ipairs(keys) do
      if i > 1 then out[#out + 1] = "," end
      local x = v[k]
      if x == nil then x = v[tonumber(k)] end
      out[#out + 1] = pad .. jstr(k) .. sep
      encode(x, nxt, out)
    end
    out[#out + 1] = close .. "}"
  elseif tv == "number" then
    if v == math.floor(v) and math.abs(v) < 2 ^ 53 then out[#out + 1] = string.format("%d", v)
    else out[#out + 1] = string.format("%.3f", v):gsub("0+$", "") end
  elseif tv == "string" or tv == "boolean" then
    out[#out + 1] = jstr(v)
  else
    out[#out + 1] = "null"
  end
end

--- Encodes v as JSON with sorted keys (pretty when `pretty`).
function M.json(v, pretty)
  local out = {}
  encode(v, pretty and 0 or nil, out)
  return table.concat(out)
end

-- ---------------------------------------------------------------- views

--- One line for an error: message [kind, EnOS code, HTTP status, request id].
function M.error_text(err)
  if type(err) ~= "table" then return tostring(err) end
  local tags = { tostring(err.kind) }
  if err.field then tags[#tags + 1] = "field " .. tostring(err.field) end
  if err.code then tags[#tags + 1] = "code " .. tostring(err.code) end
  if err.status then tags[#tags + 1] = "HTTP " .. tostring(err.status) end
  if err.request_id then tags[#tags + 1] = "request " .. tostring(err.request_id) end
  return tostring(err.message) .. " [" .. table.concat(tags, ", ") .. "]"
end

--- The plain-table view of an error (never a secret: errors are scrubbed at the source).
function M.error_view(err)
  if not err then return nil end
  return { kind = err.kind, code = err.code, status = err.status, message = err.message,
    request_id = err.request_id, step = err.step, field = err.field,
    outcome_unknown = err.outcome_unknown or nil }
end

local function round_ms(ms) return ms and math.floor(ms + 0.5) end

--- The JSON view of a workflow report. The secret only with show_secret.
function M.report_view(r, show_secret)
  local v = {
    ok = r.ok, outcome = r.outcome, attempts = r.attempts, ms = round_ms(r.ms),
    target = r.target, require_secret = r.require_secret,
    warnings = M.array(r.warnings), subdevices = r.subdevices, gateway = r.gateway, tags = r.tags,
  }
  if r.certificates then
    local c = r.certificates
    v.certificates = { valid_before = c.valid_before, revoked = c.revoked and M.array(c.revoked), issued = c.issued,
      reused = c.reused }
  end
  if r.after then v.after = M.array(r.after) end
  if r.old then v.old = r.old end
  if r.new then
    local n = r.new
    v.new = { assetId = n.assetId, productKey = n.productKey, deviceKey = n.deviceKey, status = n.status,
      requestId = n.requestId }
    local secret = { requested = r.require_secret,
      obtained = n.deviceSecret and "clear" or (n.encrypted and "encrypted" or "none") }
    if r.delivered then secret.file = r.delivered.path; secret.format = r.delivered.format end
    if show_secret then
      v.new.deviceSecret = n.deviceSecret
      if n.encrypted then v.new.encrypted = n.encrypted end
    end
    v.secret = secret
  end
  local steps = M.array()
  for _, s in ipairs(r.steps or {}) do
    steps[#steps + 1] = { name = s.name, outcome = s.outcome, ms = round_ms(s.ms), detail = s.detail }
  end
  v.steps = steps
  if r.wait then
    v.wait = { seconds = r.wait.seconds, online = r.wait.online, waited_ms = round_ms(r.wait.waited_ms),
      polls = r.wait.polls, status = r.wait.status }
  end
  if r.requests then
    v.requests = M.array()
    for _, q in ipairs(r.requests) do v.requests[#v.requests + 1] = { name = q.name, request = q.text } end
  end
  if r.error then v.error = M.error_view(r.error) end
  return v
end

local DEVICE_ORDER = { "assetId", "productKey", "productType", "deviceKey", "deviceName", "status", "orgId",
  "modelId", "timezone", "createTime", "activeTime", "lastOnlineTime", "lastOfflineTime", "deviceDesc" }

--- The JSON view of a Get Device result (secret fields only with show_secret).
function M.device_view(d, show_secret)
  local v = {}
  for k, x in pairs(d) do
    if k ~= "deviceSecret" and k ~= "sessionKey" and k ~= "encrypted" and k ~= "err" then v[k] = x end
  end
  if show_secret then
    v.deviceSecret = d.deviceSecret
    v.encrypted = d.encrypted
  end
  if d.err then v.decrypt_error = tostring(d.err) end
  return v
end

-- ---------------------------------------------------------------- human text

local function when(ms)
  ms = tonumber(ms)
  if not ms or ms <= 0 then return "never" end
  return os.date("!%Y-%m-%d %H:%M:%S UTC", math.floor(ms / 1000))
end

local function name_of(d)
  local n = d.deviceName
  if type(n) == "table" then n = n.defaultValue end
  return n
end

--- Human lines for a device.
function M.device_text(d, show_secret)
  local lines = {}
  local function add(k, v) if v ~= nil and v ~= "" then lines[#lines + 1] = string.format("  %-15s %s", k, clean(v)) end end
  lines[#lines + 1] = string.format("Device %s", clean(d.assetId))
  for _, k in ipairs(DEVICE_ORDER) do
    local v = d[k]
    if k == "deviceName" then v = name_of(d)
    elseif k:match("Time$") then v = v ~= nil and when(v) or nil end
    add(k, v)
  end
  if d.deviceSecret or d.encrypted then
    if show_secret then
      add("deviceSecret", d.deviceSecret or "(not decrypted)")
      if not d.deviceSecret and d.encrypted then
        add("encrypted", "deviceSecret=" .. tostring(d.encrypted.deviceSecret) .. " sessionKey=" ..
          tostring(d.encrypted.sessionKey))
      end
    else
      add("deviceSecret", d.deviceSecret and "(retrieved; hidden)" or "(encrypted; hidden)")
    end
  end
  if d.err then add("decrypt error", tostring(d.err)) end
  return table.concat(lines, "\n") .. "\n"
end

--- The plan shown before a replace.
function M.plan_text(plan, endpoint, org)
  local lines = plan.finishing and {
    string.format("About to finish a replace made before, on %s (org %s):", clean(endpoint), clean(org)),
    string.format("  asset        %s (%s, %s)", clean(plan.assetId), clean(plan.productKey), clean(plan.productType)),
    string.format("  key          %s already (nothing is replaced again)", clean(plan.newDeviceKey)),
    string.format("  status       %s", clean(plan.status)),
  } or {
    string.format("About to replace a device key on %s (org %s):", clean(endpoint), clean(org)),
    string.format("  asset        %s (%s, %s)", clean(plan.assetId), clean(plan.productKey), clean(plan.productType)),
    string.format("  key          %s  ->  %s", clean(plan.deviceKey), clean(plan.newDeviceKey)),
    string.format("  status       %s now; inactive after (the old hardware can no longer connect)", clean(plan.status)),
  }
  if plan.require_secret then
    lines[#lines + 1] = "  secret       the new deviceSecret is requested" ..
      (plan.out and (" and written to " .. plan.out) or "")
  else
    lines[#lines + 1] = "  secret       not requested"
  end
  if plan.subdevices then
    lines[#lines + 1] = string.format("  sub-devices  %d (checked after the replace)", plan.subdevices)
  end
  if plan.gateway then
    lines[#lines + 1] = string.format("  gateway      behind %s (%s/%s)", clean(plan.gateway.assetId),
      clean(plan.gateway.productKey), clean(plan.gateway.deviceKey))
  end
  for _, a in ipairs(plan.after or {}) do lines[#lines + 1] = "  then         " .. clean(a) end
  return table.concat(lines, "\n") .. "\n"
end

--- Human summary of a report.
function M.report_text(r, show_secret)
  local lines = {}
  local function add(k, v) lines[#lines + 1] = string.format("  %-12s %s", k, clean(v)) end
  local old, new = r.old or {}, r.new
  if r.outcome == "dry_run" then
    lines[#lines + 1] = string.format("Dry run: would replace %s (%s) key %s -> %s; the replace was not sent.",
      clean(old.assetId), clean(old.productKey), clean(old.deviceKey), r.target.newDeviceKey)
    if r.reads then lines[#lines + 1] = "Read-only calls made: " .. table.concat(r.reads, ", ") .. "." end
    for _, a in ipairs(r.after or {}) do lines[#lines + 1] = "Then it would " .. clean(a) .. "." end
    for _, q in ipairs(r.requests or {}) do
      lines[#lines + 1] = ""
      lines[#lines + 1] = "# " .. q.name
      lines[#lines + 1] = q.text
    end
    lines[#lines + 1] = ""
  elseif new then
    local head = r.outcome == "reconciled" and "Replaced (reconciled: a reply was lost; the device was read back)"
      or r.outcome == "finished" and "Finished (replaced before; what was left is done)" or "Replaced"
    lines[#lines + 1] = string.format("%s: asset %s (%s)", head, clean(new.assetId), clean(new.productKey))
    add("key", string.format("%s -> %s", tostring(old.deviceKey), tostring(new.deviceKey)))
    add("status", tostring(new.status or "?"))
    if show_secret and (new.deviceSecret or new.encrypted) then
      if new.deviceSecret then add("deviceSecret", new.deviceSecret)
      else add("encrypted", "deviceSecret=" .. tostring(new.encrypted.deviceSecret) .. " sessionKey=" ..
        tostring(new.encrypted.sessionKey)) end
    end
    if r.delivered then
      add("secret", string.format("written to %s (%s, mode 0600%s)", r.delivered.path, r.delivered.format,
        r.delivered.secret == "encrypted" and ", ENCRYPTED: decrypt with the application's private key" or
        (r.delivered.secret == "none" and ", no secret" or "")))
    elseif new.deviceSecret or new.encrypted then
      if not show_secret then add("secret", "obtained (not shown; use --out FILE or --show-secret)") end
    elseif r.require_secret == false then
      add("secret", "not requested")
    end
    if r.subdevices then
      add("sub-devices", string.format("%d before, %s after, %d re-attached", r.subdevices.before,
        tostring(r.subdevices.after or "?"), r.subdevices.reattached or 0))
    end
    if r.gateway then
      add("gateway", string.format("%s (%s/%s)%s", r.gateway.assetId, tostring(r.gateway.productKey),
        tostring(r.gateway.deviceKey), r.gateway.relinked and ": the link was dropped and added back" or
        (r.gateway.link_error and ": LINK NOT RESTORED" or ", link kept")))
    end
    if r.certificates and (r.certificates.issued or (r.certificates.revoked and #r.certificates.revoked > 0)) then
      local c = r.certificates
      add("certificate", string.format("%s %s; %d old revoked (superseded)%s", c.reused and "kept" or "issued",
        tostring(c.issued or "none"), #(c.revoked or {}), r.delivered and ("; in " .. r.delivered.path) or ""))
    end
    if r.tags then
      local names = {}
      for k, v in pairs(r.tags) do names[#names + 1] = k .. "=" .. v end
      table.sort(names)
      add("tags", table.concat(names, " "))
    end
    if r.wait then
      add("online", r.wait.online and ("yes, after " .. workflow.fmt_ms(r.wait.waited_ms)) or
        ("NO: not within " .. r.wait.seconds .. " s (status " .. tostring(r.wait.status) .. ")"))
    end
  end
  local st = {}
  for _, s in ipairs(r.steps or {}) do
    st[#st + 1] = s.name .. (s.outcome ~= "ok" and ("(" .. s.outcome .. ")") or "") .. " " .. workflow.fmt_ms(s.ms)
  end
  if #st > 0 then add("steps", table.concat(st, ", ")) end
  for _, w in ipairs(r.warnings or {}) do add("warning", w) end
  if r.error and new then add("PROBLEM", tostring(r.error)) end
  return table.concat(lines, "\n") .. "\n"
end

return M
