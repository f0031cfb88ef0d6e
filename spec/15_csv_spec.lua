-- core.csv_row: the batch's credentials and results lines, written in C, against the rule written in Lua.
local core = require "enos.core"
local plan = require "enos.plan"

-- The rule: quoted when holding , " CR LF; a leading = + @ TAB CR, or '-' followed by anything but
-- [%w_.-], gets a ' (a spreadsheet would evaluate it).
local function csv_cell(v)
  if v == nil then return "" end
  v = tostring(v)
  if v:match("^[=+@\t\r]") or (v:match("^%-") and not v:match("^%-[%w_.%-]*$")) then v = "'" .. v end
  if v:find('[,"\r\n]') then v = '"' .. v:gsub('"', '""') .. '"' end
  return v
end

-- csv_cell over the same columns: what csv_row must produce
local function reference(rec, columns)
  local cells = {}
  for i, c in ipairs(columns) do cells[i] = csv_cell(rec[c]) end
  return table.concat(cells, ",") .. "\n"
end

describe("core.csv_row", function()
  it("writes each column in order: nil empty, numbers and booleans as tostring", function()
    assert.equal("7,A1,,true,false,1.5,-3\n", core.csv_row({ line = 7, assetId = "A1", ok = true, no = false,
      f = 1.5, n = -3 }, { "line", "assetId", "missing", "ok", "no", "f", "n" }))
    assert.equal("\n", core.csv_row({ a = "x" }, {}))
  end)

  it("quotes , \" CR LF and neutralises what a spreadsheet would evaluate", function()
    assert.equal('"a,b","say ""hi""","l1\nl2","\'\r"\n', core.csv_row({ a = "a,b", b = 'say "hi"', c = "l1\nl2", d = "\r" },
      { "a", "b", "c", "d" }))
    assert.equal("'=SUM(A1),'+1,'@x,'\t1,-1.5,-key_1.a,'-1+2,-\n", core.csv_row(
      { a = "=SUM(A1)", b = "+1", c = "@x", d = "\t1", e = "-1.5", f = "-key_1.a", g = "-1+2", h = "-" },
      { "a", "b", "c", "d", "e", "f", "g", "h" }))
    assert.equal([["'=1,2"]] .. "\n", core.csv_row({ a = "=1,2" }, { "a" }))
  end)

  it("agrees with csv_cell on random cells, and the line splits back to what was written", function()
    local alphabet = { "a", "Z", "0", "-", "_", ".", ",", '"', "\r", "\n", "\t", "=", "+", "@", " ", "'", "é", "\0" }
    math.randomseed(20261129)
    local columns = { "c1", "c2", "c3", "c4" }
    for _ = 1, 3000 do
      local rec = {}
      for _, c in ipairs(columns) do
        if math.random() < 0.8 then
          local t = {}
          for k = 1, math.random(0, 8) do t[k] = alphabet[math.random(#alphabet)] end
          rec[c] = table.concat(t)
        end
      end
      local line = core.csv_row(rec, columns)
      assert.equal(reference(rec, columns), line)
      -- a line without CR/LF inside a cell splits back into the cells as written (neutralised ones with their ')
      local body = line:sub(1, -2)
      if not body:find("[\r\n]") then
        local cells = assert(plan.split_csv(body))
        for i, c in ipairs(columns) do
          local v = rec[c] or ""
          assert.is_true(cells[i] == v or cells[i] == "'" .. v, ("cell %d: %q vs %q"):format(i, cells[i], v))
        end
      end
    end
  end)

  it("refuses a column holding a table, and bad arguments", function()
    assert.has_error(function() core.csv_row({ a = {} }, { "a" }) end, "csv_row: column 1 holds a table")
    assert.has_error(function() core.csv_row("x", {}) end)
    assert.has_error(function() core.csv_row({}, nil) end)
  end)

  it("writes long cells whole (the buffer grows)", function()
    local big = ("x"):rep(100000) .. '"' .. ("y"):rep(5000)
    local line = core.csv_row({ a = big, b = "s" }, { "a", "b" })
    assert.equal('"' .. big:gsub('"', '""') .. '",s\n', line)
  end)
end)
