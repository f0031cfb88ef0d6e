-- Search Device expressions: cond {and cond}, cond = field = 'v' | field in ('a', 'b', …),
-- fields deviceKey, assetId, productKey, status (keywords case-insensitive, values quoted ' or ").
local M = {}

M.FIELDS = { deviceKey = true, assetId = true, productKey = true, status = true }

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

--- Parse an expression into a list of {field, values-set}; nil, err on a syntax error.
function M.parse(expr)
  local conds = {}
  if expr == nil or expr:match("^%s*$") then return conds end
  local s, i = expr, 1
  while true do
    i = skip(s, i)
    local field = s:match("^[%a_][%w_]*", i)
    if not field then return nil, "expected a field name at position " .. i end
    if not M.FIELDS[field] then return nil, "unsupported search field " .. field end
    i = skip(s, i + #field)
    local values = {}
    if s:sub(i, i) == "=" then
      local v, j = quoted(s, skip(s, i + 1))
      if not v then return nil, j end
      values[v] = true
      i = j
    elseif s:sub(i, i + 1):lower() == "in" then
      i = skip(s, i + 2)
      if s:sub(i, i) ~= "(" then return nil, "expected ( after in" end
      i = i + 1
      while true do
        local v, j = quoted(s, skip(s, i))
        if not v then return nil, j end
        values[v] = true
        i = skip(s, j)
        local c = s:sub(i, i)
        if c == ")" then i = i + 1; break end
        if c ~= "," then return nil, "expected , or ) at position " .. i end
        i = i + 1
      end
    else
      return nil, "expected = or in after " .. field
    end
    conds[#conds + 1] = { field = field, values = values }
    i = skip(s, i)
    if i > #s then break end
    local kw = s:match("^[%a]+", i)
    if not kw or kw:lower() ~= "and" then return nil, "expected and at position " .. i end
    i = i + 3
  end
  return conds
end

function M.match(conds, dev)
  for _, c in ipairs(conds) do
    if not c.values[tostring(dev[c.field])] then return false end
  end
  return true
end

return M
