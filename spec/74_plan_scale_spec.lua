-- The plan check at fleet scale: duplicates are found through 64-bit fingerprints in a C set (memory flat in
-- the plan's size), and a fingerprint match is confirmed by an exact second pass, so a collision can never
-- report a duplicate that is not there, nor hide one that is. The C helpers the reader leans on.
local plan = require "enos.plan"
local core = require "enos.core"
local H = require "helpers"

local function write_plan(dir, name, n, edit)
  local rows = { "productKey,deviceKey,newDeviceKey,site" }
  for i = 1, n do rows[#rows + 1] = ("pk_demo,OLD-%06d,NEW-%06d,s%d"):format(i, i, i % 7) end
  if edit then edit(rows) end
  local p = dir .. "/" .. name
  H.writefile(p, table.concat(rows, "\n") .. "\n")
  return p
end

local function messages(res)
  local out = {}
  for _, e in ipairs(res.errors) do out[#out + 1] = e.line .. ": " .. e.message end
  return out
end

-- rows[k + 1] is line k + 1 of the file (line 1 is the header): row i is on line i + 1
local function planted(rows)
  rows[12001] = "pk_demo,OLD-000007,NEW-900001,s"        -- line 12001: the device of line 8 again
  rows[15001] = "pk_demo,OLD-915000,NEW-000009,s"        -- line 15001: the new key of line 10 again
  rows[17001] = "pk_demo,NEW-000003,NEW-917000,s"        -- line 17001: a device that line 4 renames to
  rows[19001] = "pk_demo,OLD-919000,OLD-000005,s"        -- line 19001: a new key line 6's device has now
  rows[13001] = "pk_demo,OLD-913000,bad key,s"           -- line 13001: a row error between them
end

local EXPECTED = {
  "12001: the same device as line 8",
  "13001: newDeviceKey must be 4-64 characters of letters, digits, '-', '_' or '.'",
  "15001: newDeviceKey NEW-000009 is also the new key of line 10",
  "17001: deviceKey NEW-000003 is the new key of line 4 (chained renames are not supported in one batch)",
  "19001: newDeviceKey OLD-000005 is the current key of line 6 (chained renames are not supported in one batch)",
}

describe("plan check at scale", function()
  local dir
  setup(function() dir = H.tmpdir() end)

  it("finds duplicates 12,000 lines apart, in line order with the row errors, exactly", function()
    local res = assert(plan.check(write_plan(dir, "dups.csv", 20000, planted)))
    assert.equal(20000, res.rows)
    assert.same(EXPECTED, messages(res))
    assert.equal(5, res.error_count)
  end)

  it("a clean 20,000-row plan has no errors", function()
    local res = assert(plan.check(write_plan(dir, "clean.csv", 20000)))
    assert.equal(20000, res.rows)
    assert.equal(0, res.error_count)
    assert.same({ "site" }, res.extra_columns)
  end)

  it("caps the listed errors, counts them all", function()
    local p = write_plan(dir, "many.csv", 3000, function(rows)
      for i = 4, 3000, 2 do rows[i] = ("pk_demo,OLD-000001,NEW-8%05d,s"):format(i) end   -- 1,499 name line 2's
      rows[1001] = "pk_demo,OLD-991000,x,s"                       -- and one row error among them
    end)
    local res = assert(plan.check(p, nil, 10))
    assert.equal(10, #res.errors)
    assert.equal(1500, res.error_count)                           -- 1,499 repeats of line 2 and the bad key
    local lines = {}
    for _, e in ipairs(res.errors) do lines[#lines + 1] = e.line end
    assert.same({ 4, 6, 8, 10, 12, 14, 16, 18, 20, 22 }, lines)
  end)

  describe("when every fingerprint collides", function()
    -- a set that says "seen" for every key after the first: the worst a hash could do
    local real = core.keyset
    before_each(function()
      core.keyset = function()
        local n = 0
        return {
          add = function() n = n + 1 return n > 1 end,
          has = function() return n > 0 end,
          count = function() return n end,
          free = function() end,
        }
      end
    end)
    after_each(function() core.keyset = real end)

    it("the second pass reports only the real duplicates", function()
      local res = assert(plan.check(write_plan(dir, "dups2.csv", 20000, planted)))
      assert.same(EXPECTED, messages(res))
      local clean = assert(plan.check(write_plan(dir, "clean2.csv", 5000)))
      assert.equal(0, clean.error_count)
    end)
  end)

  it("a JSONL plan's duplicates the same way", function()
    local lines = {}
    for i = 1, 5000 do
      lines[i] = ('{"assetId":"A%06d","newDeviceKey":"NEW-%06d","n":%d}'):format(i, i, i)
    end
    lines[4000] = '{"assetId":"A000010","newDeviceKey":"NEW-904000"}'
    local p = dir .. "/dups.jsonl"
    H.writefile(p, table.concat(lines, "\n") .. "\n")
    local res = assert(plan.check(p))
    assert.same({ "4000: the same device as line 10" }, messages(res))
  end)
end)

describe("plan.repeated_key", function()
  it("a repeated key is found however the line spaces or escapes it", function()
    assert.equal("assetId", plan.repeated_key('{"assetId":"A", "asset\\u0049d" :"B"}', 1))
    assert.is_nil(plan.repeated_key('{"assetId":"A:B","note":"x\\":y"}', 2))
  end)
end)
