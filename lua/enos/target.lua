--- The one validation of a replace's target: which device (`assetId`, or `productKey` + `deviceKey`), its new
-- key (`newDeviceKey`) and its org (`orgId`). The client, the workflow, the plan and the CLI all check targets
-- here, so a value one refuses the others refuse too, with the same words (the CLI names its flags instead of
-- the fields: `names`).
-- @module enos.target
local json = require "enos.json"

local M = {}

--- The fields of a target, in order.
M.FIELDS = { "assetId", "productKey", "deviceKey", "newDeviceKey", "orgId" }
--- Bytes in one field's value: the platform's identifiers are short.
M.MAX = 64
--- The pattern of a device key: letters, digits, '-', '_', '.'.
M.KEY_PATTERN = "^[A-Za-z0-9_.%-]+$"

--- Whether v holds an invisible or text-direction character (zero-width space or joiner, bidi controls, BOM,
-- soft hyphen): an identifier with one looks like another, names no device, and reorders a terminal line it is
-- printed in. Returns a position | nil.
function M.invisible(v)
  return v:find("\194\173") or v:find("\226\128[\139-\143\170-\174]") or v:find("\226\129[\160-\164\166-\169]")
    or v:find("\239\187\191") or nil
end

--- Checks one identifier value. Returns nil when it is fine, else what is wrong (a phrase to follow the name).
-- @param v the value
-- @tparam[opt=64] number max the longest allowed, in bytes
function M.value_problem(v, max)
  max = max or M.MAX
  -- the common case, printable ASCII of a fitting length, in one scan
  if type(v) == "string" and v ~= "" and #v <= max and not v:find("[^\32-\126]") then return nil end
  if type(v) ~= "string" then return "must be a string, got " .. type(v) end
  if v == "" then return "must not be empty" end
  if #v > max then return "is longer than " .. max .. " bytes" end
  if v:find("[%z\1-\31\127]") then return "contains control characters" end
  if not json.valid_utf8(v) then return "is not valid UTF-8" end
  if M.invisible(v) then
    return "contains an invisible or text-direction character (zero-width space, bidi control, BOM, soft " ..
      "hyphen: a copy-paste?)"
  end
  return nil
end

--- Checks a new device key. Returns nil | message.
-- @param v the value
-- @tparam[opt="newDeviceKey"] string name how the message names it (a flag, say)
function M.key_problem(v, name)
  name = name or "newDeviceKey"
  if v == nil then return name .. " is required (a string of 4-64 letters, digits, '-', '_', '.')" end
  if type(v) ~= "string" or #v < 4 or #v > 64 or not v:match(M.KEY_PATTERN) then
    return name .. " must be 4-64 characters of letters, digits, '-', '_' or '.'"
  end
  return nil
end

local function named(names, k) return names and names[k] or k end

--- Checks a target. Returns the target (a new table of the known fields) | nil, message, field.
-- @tparam table t {assetId | productKey + deviceKey, newDeviceKey, orgId}
-- @tparam[opt] table opts new_key = false (a read: no newDeviceKey), unknown = "refuse" (a field not in
-- FIELDS is an error; default: ignored), names = {field → name in messages} (the CLI's flags)
function M.check(t, opts)
  opts = opts or {}
  local names = opts.names
  if opts.unknown == "refuse" then
    for k in pairs(t) do
      local known = false
      for _, f in ipairs(M.FIELDS) do if f == k then known = true end end
      if not known then return nil, "unknown target field '" .. tostring(k) .. "'", tostring(k) end
    end
  end
  for _, k in ipairs(M.FIELDS) do
    local v = t[k]
    if v ~= nil and k ~= "newDeviceKey" then
      local why = M.value_problem(v)
      if why then return nil, named(names, k) .. " " .. why, k end
    end
  end
  local a, p, d = named(names, "assetId"), named(names, "productKey"), named(names, "deviceKey")
  if t.assetId and (t.productKey or t.deviceKey) then
    return nil, "give either " .. a .. " or " .. p .. " with " .. d .. ", not both", "assetId"
  end
  if not t.assetId then
    if not t.productKey and not t.deviceKey then
      return nil, "which device? give " .. a .. ", or " .. p .. " with " .. d, "assetId"
    end
    if not t.productKey then return nil, p .. " is required with " .. d, "productKey" end
    if not t.deviceKey then return nil, d .. " is required with " .. p, "deviceKey" end
  end
  if opts.new_key ~= false then
    local why = M.key_problem(t.newDeviceKey, named(names, "newDeviceKey"))
    if why then return nil, why, "newDeviceKey" end
    if t.deviceKey and t.deviceKey == t.newDeviceKey then
      return nil, named(names, "newDeviceKey") .. " equals the current " .. d, "newDeviceKey"
    end
  end
  return { assetId = t.assetId, productKey = t.productKey, deviceKey = t.deviceKey, newDeviceKey = t.newDeviceKey,
    orgId = t.orgId }
end

return M
