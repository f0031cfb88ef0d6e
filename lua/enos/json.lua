--- JSON helpers over lua-cjson: safe decode, ordered encode for request bodies.
-- @module enos.json
local cjson = require "cjson.safe"

local M = {}
--- JSON null as lua-cjson decodes it (`cjson.null`).
M.null = cjson.null

--- Decodes s; returns value | nil, message. JSON null becomes nil inside tables.
function M.decode(s)
  local v, err = cjson.decode(s)
  if v == nil and err then return nil, err end
  return v
end

--- Encodes a value. Numbers that are whole are written without an exponent.
function M.encode(v)
  return cjson.encode(v)
end

--- Encodes an object with the given key order first (deterministic bodies make
-- dry runs and signatures reproducible); other keys follow sorted.
function M.encode_object(t, order)
  local out, seen = {}, {}
  local function add(k)
    local v = t[k]
    if v ~= nil then
      local ev
      if type(v) == "number" and v == math.floor(v) and math.abs(v) < 2^53 then
        ev = string.format("%d", v)
      else
        ev = assert(cjson.encode(v))
      end
      out[#out + 1] = cjson.encode(k) .. ":" .. ev
    end
    seen[k] = true
  end
  for _, k in ipairs(order or {}) do add(k) end
  local rest = {}
  for k in pairs(t) do if not seen[k] then rest[#rest + 1] = k end end
  table.sort(rest)
  for _, k in ipairs(rest) do add(k) end
  return "{" .. table.concat(out, ",") .. "}"
end

--- Replaces cjson.null values by nil, `depth` levels deep (default 2: an
-- envelope and its data; deeper nulls, e.g. inside deviceAttributes, stay).
function M.strip_null(v, depth)
  if v == cjson.null then return nil end
  depth = depth or 2
  if type(v) == "table" and depth > 0 then
    for k, x in pairs(v) do
      if x == cjson.null then v[k] = nil
      elseif type(x) == "table" and depth > 1 then M.strip_null(x, depth - 1) end
    end
  end
  return v
end

--- True when s is valid UTF-8 (no overlongs, surrogates or code points past U+10FFFF).
function M.valid_utf8(s)
  if not s:find("[\128-\255]") then return true end
  local i, n = 1, #s
  while i <= n do
    local c = s:byte(i)
    local len, min
    if c < 0x80 then len = 1
    elseif c >= 0xC2 and c <= 0xDF then len, min = 2, 0x80
    elseif c >= 0xE0 and c <= 0xEF then len, min = 3, 0x800
    elseif c >= 0xF0 and c <= 0xF4 then len, min = 4, 0x10000
    else return false end
    if len > 1 then
      local cp = c % (2 ^ (7 - len))
      for j = i + 1, i + len - 1 do
        local b = s:byte(j)
        if not b or b < 0x80 or b > 0xBF then return false end
        cp = cp * 64 + b % 64
      end
      if cp < min or cp > 0x10FFFF or (cp >= 0xD800 and cp <= 0xDFFF) then return false end
    end
    i = i + len
  end
  return true
end

return M
