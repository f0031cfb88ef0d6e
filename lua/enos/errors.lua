--- Structured errors: `nil, err` where err is a table with a stable `kind`.
-- @module enos.errors
local M = {}

--- The stable error kinds (docs/design.md).
M.KINDS = {
  invalid_argument = true, config = true, auth = true, permission = true, not_found = true,
  conflict = true, rate_limited = true, server = true, timeout = true, transport = true,
  tls = true, protocol = true, decrypt = true,
}

local RETRYABLE = { rate_limited = true, server = true, timeout = true, transport = true }

local mt = {}
mt.__index = mt
mt.__name = "enos.error"

function mt.__tostring(e)
  local parts = { "enos:", e.kind }
  if e.code then parts[#parts + 1] = tostring(e.code) end
  if e.status and not e.code then parts[#parts + 1] = "HTTP " .. tostring(e.status) end
  parts[#parts + 1] = e.message or "(no message)"
  local s = table.concat(parts, " ")
  if e.retry_after then s = s .. string.format(" (retry after %s s)", e.retry_after) end
  if e.request_id then s = s .. " (request " .. e.request_id .. ")" end
  -- (a message extended after it was made is cleaned here too)
  return M.clean(s, 2 * M.MAX_MESSAGE)
end

--- Bytes of an error message (what the platform echoes is cut past this).
M.MAX_MESSAGE = 1000

-- C0 and C1 control characters (ESC of an escape sequence, CR, LF, BEL, CSI 0x9b in UTF-8 as C2 9B, …)
local function escape_control(c) return string.format("\\x%02x", c:byte(-1)) end

--- What the platform (or a plan) sent, made safe to print: control characters become visible `\xNN`
-- escapes, so an envelope's `msg` cannot move the cursor, rewrite a line or forge another; cut at `max` bytes.
function M.clean(s, max)
  if type(s) ~= "string" then return s end
  if s:find("[%z\1-\31\127\194]") then
    s = s:gsub("\194[\128-\159]", escape_control):gsub("[%z\1-\31\127]", escape_control)
  end
  max = max or M.MAX_MESSAGE
  if #s > max then
    local cut = max
    -- (not inside a UTF-8 sequence)
    while cut > 0 and s:byte(cut + 1) and s:byte(cut + 1) >= 0x80 and s:byte(cut + 1) < 0xC0 do cut = cut - 1 end
    s = s:sub(1, cut) .. "…"
  end
  return s
end

-- Lua 5.4 decodes JSON's 1003 as 1003.0: codes and statuses are kept as the integers they are.
local tointeger = math.tointeger
local function int(v)
  if tointeger and type(v) == "number" then return tointeger(v) or v end
  return v
end

--- Creates an error. `fields` may carry code, status, request_id, field, retry_after, retryable, …
function M.new(kind, message, fields)
  assert(M.KINDS[kind], "unknown error kind " .. tostring(kind))
  local e = {}
  if fields then for k, v in pairs(fields) do e[k] = v end end
  e.kind, e.message = kind, M.clean(message)
  e.code, e.status = int(e.code), int(e.status)
  if type(e.request_id) == "string" then e.request_id = M.clean(e.request_id, 128) end
  if e.retryable == nil then e.retryable = RETRYABLE[kind] or false end
  return setmetatable(e, mt)
end

--- True when v is an enos error.
function M.is(v) return getmetatable(v) == mt end

--- invalid_argument naming the field.
function M.arg(field, message)
  return M.new("invalid_argument", message, { field = field })
end

--- Cuts a raw body to a readable, single-line message: control characters become spaces, cut at `max`
-- bytes (default 200).
function M.trim(s, max)
  s = tostring(s or ""):gsub("[%c]+", " "):gsub("^%s+", ""):gsub("%s+$", "")
  max = max or 200
  if #s > max then s = s:sub(1, max) .. "…" end
  return s
end

--- Removes every occurrence of the given secrets from a message.
function M.scrub(s, secrets)
  if type(s) ~= "string" then return s end
  for _, secret in ipairs(secrets) do
    if type(secret) == "string" and #secret >= 4 then
      local i = 1
      while true do
        local a, b = s:find(secret, i, true)
        if not a then break end
        s = s:sub(1, a - 1) .. "<redacted>" .. s:sub(b + 1)
        i = a + 10
      end
    end
  end
  return s
end

-- EnOS business codes → kinds.
local CODE_KIND = {
  [11702] = "conflict", [11704] = "invalid_argument", [99400] = "invalid_argument",
  [99403] = "permission", [99404] = "not_found", [11858] = "config", [99500] = "server",
  [1203] = "auth", [11404] = "not_found", [11833] = "conflict",
}

--- Maps a business envelope with a non-zero code.
function M.from_code(code, msg, request_id)
  if type(code) == "number" and code % 1 == 0 then code = tonumber(string.format("%d", code)) end
  local kind = CODE_KIND[code] or "server"
  local message = msg ~= nil and tostring(msg) or ""
  local lower = message:lower()
  if code == 99400 and (lower:find("device", 1, true) or lower:find("asset", 1, true))
    and (lower:find("not exist", 1, true) or lower:find("not found", 1, true)) then
    kind = "not_found"
  elseif code == 11858 then
    message = "no RSA key pair is registered for this application (" .. message .. ")"
  end
  return M.new(kind, message, {
    code = code, request_id = request_id,
    retryable = code == 99500,
  })
end

--- Maps a gateway-level HTTP error (non-2xx).
function M.from_status(status, headers, body)
  local kind
  if status == 401 then kind = "auth"
  elseif status == 403 then kind = "permission"
  elseif status == 404 then kind = "not_found"
  elseif status == 400 or status == 413 then kind = "invalid_argument"
  elseif status == 429 then kind = "rate_limited"
  elseif status >= 500 then kind = "server"
  else kind = "protocol" end
  local fields = { status = status }
  if status == 429 or status == 503 then
    local ra = headers and tonumber(headers["retry-after"])
    if ra and ra >= 0 then fields.retry_after = ra end
  end
  local msg = M.trim(body)
  if msg == "" then msg = "HTTP " .. status end
  return M.new(kind, msg, fields)
end

--- Maps an error table from a transport ({kind=, message=, …}) to an enos error.
function M.from_transport(t)
  if M.is(t) then return t end
  if type(t) ~= "table" then
    return M.new("transport", tostring(t))
  end
  local kind = M.KINDS[t.kind] and t.kind or "transport"
  return M.new(kind, t.message or kind, {
    curl_code = t.curl_code, request_sent = t.request_sent,
  })
end

return M
