-- Search Device expressions: term {or term}, term = cond {and cond} (and binds tighter than or), cond =
--   field = 'v' | field != 'v' | field in ('a', 'b', …) | field exists
-- fields deviceKey, assetId, productKey, status (= and in), deviceTags.<name> and deviceAttributes.<name> (=, !=,
-- in, exists). Keywords case-insensitive, values quoted ' or ". A tag that is absent matches neither = nor !=.
local M = {}

M.FIELDS = { deviceKey = true, assetId = true, productKey = true, status = true }
local MAPS = { deviceTags = true, deviceAttributes = true }

local function skip(s, i)
  return (s:find("[^%s]", i)) or #s + 1
end

local function quoted(s, i)
  local q = s:sub(i, i)
  if q ~= "'" and q ~= '"' then return nil, "expected a quoted value at position " .. i end
  local j = s:find(q, i + 1, true)
  if not j then return nil, "unterminated string at position " .. i end
  return s:sub(i + 1, j - 1), j + 1
end

-- One condition at i: cond, next position | nil, err.
local function condition(s, i)
  local field = s:match("^[%a_][%w_]*%.?[%w_]*", i)
  if not field or field == "" then return nil, "expected a field name at position " .. i end
  local map, key = field:match("^([%a_][%w_]*)%.([%w_]+)$")
  if map then
    if not MAPS[map] then return nil, "unsupported search field " .. field end
  elseif not M.FIELDS[field] then
    return nil, "unsupported search field " .. field
  end
  i = skip(s, i + #field)
  local c = { field = field, map = map, key = key, values = {} }
  local two = s:sub(i, i + 1)
  if two == "!=" and map then
    local v, j = quoted(s, skip(s, i + 2))
    if not v then return nil, j end
    c.op, c.values[v] = "ne", true
    return c, j
  elseif s:sub(i, i) == "=" then
    local v, j = quoted(s, skip(s, i + 1))
    if not v then return nil, j end
    c.op, c.values[v] = "in", true
    return c, j
  elseif two:lower() == "in" and not s:sub(i + 2, i + 2):match("[%w_]") then
    i = skip(s, i + 2)
    if s:sub(i, i) ~= "(" then return nil, "expected ( after in" end
    i = i + 1
    while true do
      local v, j = quoted(s, skip(s, i))
      if not v then return nil, j end
      c.values[v] = true
      i = skip(s, j)
      local ch = s:sub(i, i)
      if ch == ")" then i = i + 1 break end
      if ch ~= "," then return nil, "expected , or ) at position " .. i end
      i = i + 1
    end
    c.op = "in"
    return c, i
  elseif map and s:sub(i, i + 5):lower() == "exists" and not s:sub(i + 6, i + 6):match("[%w_]") then
    c.op = "exists"
    return c, i + 6
  end
  return nil, "expected " .. (map and "=, !=, in or exists" or "= or in") .. " after " .. field
end

--- Parse an expression into a list of {field, op, values} conditions joined by `and`, or — when the
-- expression has `or` — such lists in `.any` (any one list matching is a match); nil, err on a syntax error.
function M.parse(expr)
  local groups, conds = {}, {}
  if expr == nil or expr:match("^%s*$") then return conds end
  local s, i = expr, 1
  while true do
    i = skip(s, i)
    local c, j = condition(s, i)
    if not c then return nil, j end
    conds[#conds + 1] = c
    i = skip(s, j)
    if i > #s then break end
    local kw = s:match("^[%a]+", i)
    kw = kw and kw:lower()
    if kw == "and" then i = i + 3
    elseif kw == "or" then
      groups[#groups + 1] = conds
      conds = {}
      i = i + 2
    else
      return nil, "expected and or or at position " .. i
    end
  end
  if #groups == 0 then return conds end
  groups[#groups + 1] = conds
  return { any = groups }
end

local function value_of(c, dev)
  if c.map then
    local m = dev[c.map]
    local v = type(m) == "table" and m[c.key] or nil
    return v ~= nil and tostring(v) or nil
  end
  return tostring(dev[c.field])
end

local function all(conds, dev)
  for _, c in ipairs(conds) do
    local v = value_of(c, dev)
    if c.op == "exists" then
      if v == nil then return false end
    elseif c.op == "ne" then
      if v == nil or c.values[v] then return false end
    elseif v == nil or not c.values[v] then
      return false
    end
  end
  return true
end

function M.match(conds, dev)
  if conds.any then
    for _, g in ipairs(conds.any) do if all(g, dev) then return true end end
    return false
  end
  return all(conds, dev)
end

return M
