-- Plans and command lines that would name the wrong device, or fail only after a replace: refused at the
-- check, with the line, before any request. Repeated CSV columns and JSONL keys, a known column in another
-- case, plan columns that collide with the outputs' own, values the outputs cannot encode (NaN, Infinity),
-- lines without bounds, and single-valued flags given twice.
local plan = require "enos.plan"
local batch = require "enos.batch"
local cli = require "enos.cli"
local json = require "enos.json"
local core = require "enos.core"
local cjson = require "cjson"
local H = require "helpers"
local sim = dofile("spec/sim_helper.lua")

local ORG = "o15724268424841"

local function check_text(dir, name, text)
  local p = dir .. "/" .. name
  H.writefile(p, text)
  return assert(plan.check(p)), p
end

local function messages(res)
  local out = {}
  for _, e in ipairs(res.errors) do out[#out + 1] = e.line .. ": " .. e.message end
  return table.concat(out, "\n")
end

describe("plan check refuses", function()
  local dir
  setup(function() dir = H.tmpdir() end)
  teardown(function() H.sh("rm -rf " .. dir) end)

  it("a CSV header that repeats a column (the last one would name another device)", function()
    local res = check_text(dir, "dup.csv",
      "productKey,deviceKey,newDeviceKey,deviceKey\npk_demo,OLD-00001,NEW-00001,OLD-00009\n")
    assert.equal(1, res.error_count, messages(res))
    assert.matches("1: header: column deviceKey appears twice", messages(res), 1, true)
    -- an extra column repeated is refused the same way (one of the two values would be lost)
    res = check_text(dir, "dup2.csv", "assetId,newDeviceKey,site,site\nA1,NEW-00001,x,y\n")
    assert.matches("column site appears twice", messages(res), 1, true)
    -- (spaces around a name do not make it another column)
    res = check_text(dir, "dup3.csv", "assetId,newDeviceKey, assetId\nA1,NEW-00001,A2\n")
    assert.matches("column assetId appears twice", messages(res), 1, true)
  end)

  it("spreadsheet exports in their own words: CR-only line ends, tab-separated, a trailing comma", function()
    local res = check_text(dir, "cr.csv", "productKey,deviceKey,newDeviceKey\rpk_demo,OLD-00001,NEW-00001\r")
    assert.matches("1: header: the plan's lines end with a carriage return only (an old Mac export)", messages(res),
      1, true)
    res = check_text(dir, "tab.csv", "productKey\tdeviceKey\tnewDeviceKey\npk_demo\tOLD-00001\tNEW-00001\n")
    assert.matches("1: header: the plan is tab-separated", messages(res), 1, true)
    res = check_text(dir, "comma.csv", "productKey,deviceKey,newDeviceKey,\npk_demo,OLD-00001,NEW-00001,\n")
    assert.matches("1: header: an empty column name at the end (a trailing comma in the header?)", messages(res), 1,
      true)
  end)

  it("a known column in another case (DeviceKey for deviceKey would be carried, not used)", function()
    local res = check_text(dir, "case.csv", "productKey,DeviceKey,deviceKey,newDeviceKey\npk,X,OLD-1,NEW-00001\n")
    assert.matches("column DeviceKey: did you mean deviceKey?", messages(res), 1, true)
    res = check_text(dir, "case.jsonl", '{"assetId":"A1","newDeviceKey":"NEW-00001","AssetId":"A2"}\n')
    assert.matches("column AssetId: did you mean assetId?", messages(res), 1, true)
  end)

  it("a JSONL object with a repeated key, written plainly or with escapes", function()
    local res = check_text(dir, "dupkey.jsonl", table.concat({
      '{"assetId":"A1","newDeviceKey":"NEW-00001"}',
      '{"assetId":"A2","newDeviceKey":"NEW-00002","assetId":"A9"}',
      '{"assetId":"A3","newDeviceKey":"NEW-00003","asset\\u0049d":"A8"}',
      '{"assetId":"A4","note":"has \\": inside","newDeviceKey":"NEW-00004"}',
    }, "\n") .. "\n")
    local m = messages(res)
    assert.equal(2, res.error_count, m)
    assert.matches("2: field assetId appears twice", m, 1, true)
    assert.matches("3: field assetId appears twice", m, 1, true)
    assert.equal(2, res.rows)       -- (the rows read whole; the two refused are counted as errors)
  end)

  it("values no output can encode (NaN, Infinity, 1e999 as Python writes them), before anything is sent", function()
    -- what would happen after the replace: the outputs' encoders refuse them
    for _, v in ipairs { 0 / 0, math.huge, -math.huge } do
      assert.is_nil((json.encode { v = v }))
    end
    local lines = {}
    for i, v in ipairs { "NaN", "Infinity", "-Infinity", "1e999", "-1e999" } do
      lines[i] = ('{"assetId":"A%d","newDeviceKey":"NEW-0000%d","weight":%s}'):format(i, i, v)
    end
    lines[#lines + 1] = '{"assetId":"A9","newDeviceKey":"NEW-00009","weight":1e300}'
    local res = check_text(dir, "nan.jsonl", table.concat(lines, "\n") .. "\n")
    assert.equal(5, res.error_count, messages(res))
    for i = 1, 5 do
      assert.matches(i .. ": column weight is not a finite number", messages(res), 1, true)
    end
  end)

  it("plan columns that collide with the outputs' own columns", function()
    for _, name in ipairs { "deviceSecret", "encryptedSecret", "sessionKey", "outcome", "line", "target",
      "error_kind", "error_code", "message" } do
      local res = check_text(dir, "collide.csv", "assetId,newDeviceKey," .. name .. "\nA1,NEW-00001,x\n")
      assert.matches("header: column " .. name .. " is a name the batch's output files use", messages(res), 1, true)
      res = check_text(dir, "collide.jsonl", ('{"assetId":"A1","newDeviceKey":"NEW-00001","%s":"x"}\n'):format(name))
      assert.matches("1: column " .. name .. " is a name the batch's output files use", messages(res), 1, true)
    end
  end)

  it("a line over 64 KiB: named by its number, not quoted, the rest of the plan still read", function()
    local big = string.rep("x", 200 * 1024)
    local res = check_text(dir, "long.csv", "assetId,newDeviceKey,note\nA1,NEW-00001," .. big .. "\nA2,NEW-00002,ok\n")
    local m = messages(res)
    assert.matches("2: the line is longer than 65536 bytes", m, 1, true)
    assert.equal(1, res.error_count, m)
    assert.is_true(#m < 200)
    -- a quoted field whose line breaks carry it past the cap is one record, refused the same way
    local lines = {}
    for i = 1, 2000 do lines[i] = string.rep("y", 60) end
    res = check_text(dir, "longq.csv", 'assetId,newDeviceKey,note\nA1,NEW-00001,"' .. table.concat(lines, "\n") ..
      '"\nA2,NEW-00002,ok\n')
    assert.matches("2: the record is longer than 65536 bytes", messages(res), 1, true)
    -- a 10 MiB header is fatal, and its message stays short (it used to echo the whole header)
    res = check_text(dir, "longh.csv", string.rep("h", 10 * 1024 * 1024) .. "\nA1,NEW-00001\n")
    m = messages(res)
    assert.matches("1: the line is longer than 65536 bytes", m, 1, true)
    assert.is_true(#m < 200, #m)
    res = check_text(dir, "badh.csv", "assetId," .. string.rep("z", 5000) .. "\nA1,NEW-00001\n")
    assert.is_true(#messages(res) < 400, #messages(res))
  end)

  it("what is not a text plan, each with what to do: a directory, UTF-16, gzip, an .xlsx, a binary file", function()
    local function refused(name, bytes)
      local p = dir .. "/" .. name
      if bytes then H.writefile(p, bytes) end
      local res, err = plan.check(p)
      assert.is_nil(res, name)
      return err
    end
    H.sh("mkdir -p " .. dir .. "/adir.csv")
    assert.matches("it is a directory, not a regular file", refused("adir.csv"), 1, true)
    local utf16 = "\255\254" .. ("assetId,newDeviceKey\nA1,NEW-00001\n"):gsub(".", "%0\0")
    assert.matches("UTF-16 text", refused("u16.csv", utf16), 1, true)
    assert.matches("save it as \"CSV UTF-8\"", refused("u16be.csv", "\254\255\0a"), 1, true)
    assert.matches("gzip-compressed", refused("p.csv.gz", "\31\139\8\0rest"), 1, true)
    assert.matches("ZIP archive (an .xlsx workbook?)", refused("p.xlsx", "PK\3\4rest"), 1, true)
    assert.matches("binary, not text", refused("p.bin", "\0\0\0\0"), 1, true)
    -- and a JSONL line that is JSON but not an object says what it is
    local res = check_text(dir, "arr.jsonl", '{"assetId":"A1","newDeviceKey":"NEW-00001"}\n[1,2]\n"text"\nnull\n')
    local m = messages(res)
    assert.matches("2: not a JSON object: it is an array", m, 1, true)
    assert.matches("3: not a JSON object: it is a string", m, 1, true)
    assert.matches("4: not a JSON object: it is null", m, 1, true)
  end)

  it("identifiers with invisible or text-direction characters (zero-width space, bidi overrides, BOM)", function()
    local res = check_text(dir, "invisible.csv", table.concat({ "assetId,newDeviceKey",
      "A1\226\128\139,NEW-00001", "A2\226\128\174xx,NEW-00002", "\239\187\191A3,NEW-00003", "A4\194\173,NEW-00004",
      "A5\226\129\167,NEW-00005", "Ä6,NEW-00006" }, "\n") .. "\n")
    local m = messages(res)
    for line = 2, 6 do assert.matches(line .. ": assetId contains an invisible or text-direction character", m, 1, true) end
    assert.equal(5, res.error_count, m)           -- (a letter with an accent is fine)
  end)
end)

describe("plan extras in the outputs", function()
  local h, kp, dir
  setup(function()
    kp = H.keypair()
    dir = H.tmpdir()
    local devices = {}
    for i = 1, 4 do devices[i] = { productKey = "pk_demo", deviceKey = ("OLD-%05d"):format(i), assetId = ("A%07d"):format(i) } end
    h = sim.start { config = { apps = { { access_key = "ak", secret_key = "sk", public_key_file = kp.public_file } },
      devices = devices } }
  end)
  teardown(function()
    if h then h:stop() end
    H.sh("rm -rf " .. dir)
  end)

  it("JSONL extra fields become CSV output columns, as CSV plan columns do", function()
    local p = dir .. "/plan.jsonl"
    H.writefile(p, '{"assetId":"A0000001","newDeviceKey":"NEW-00001","site":"North","rack":7}\n' ..
      '{"assetId":"A0000002","newDeviceKey":"NEW-00002","site":"South"}\n')
    local c = assert(require("enos").client { endpoint = h.url, access_key = "ak", secret_key = "sk", org_id = ORG,
      private_key_file = kp.private_file })
    local s = assert(batch.run(c, p, { journal = dir .. "/j", out = dir .. "/creds.csv", settle_ms = 10 }))
    assert.equal(2, s.done)
    local rows = {}
    for line in io.lines(dir .. "/creds.csv") do rows[#rows + 1] = plan.split_csv(line) end
    assert.same({ "line", "assetId", "productKey", "deviceKey", "deviceSecret", "encryptedSecret", "sessionKey",
      "outcome", "rack", "site" }, rows[1])
    local by = {}
    for i = 2, #rows do by[rows[i][2]] = rows[i] end
    assert.equal("North", by.A0000001[10])
    assert.equal("7", by.A0000001[9])
    assert.equal("South", by.A0000002[10])
    local results = H.readfile(dir .. "/j.results.csv")
    assert.matches("^line,target,newDeviceKey,assetId,outcome,error_kind,error_code,message,rack,site\n", results)
  end)

  it("enos-replace batch --check names these with the line and exits 2, sending nothing", function()
    local p = dir .. "/bad.csv"
    H.writefile(p, "productKey,deviceKey,newDeviceKey,deviceKey\npk_demo,OLD-00001,NEW-00001,OLD-00003\n")
    local before = #h:log()
    local e = {}
    local code = cli.main { argv = { "batch", p, "--check" }, env = { ENOS_ENDPOINT = h.url, ENOS_ACCESS_KEY = "ak",
      ENOS_SECRET_KEY = "sk", ENOS_ORG_ID = ORG, ENOS_CONFIG = dir .. "/none", HOME = dir },
      stdout = function() end, stderr = function(x) e[#e + 1] = x end }
    assert.equal(2, code)
    assert.matches("bad.csv:1: header: column deviceKey appears twice", table.concat(e), 1, true)
    assert.equal(before, #h:log())
  end)
end)

describe("single-valued flags", function()
  local function run(argv)
    local e = {}
    local code = cli.main { argv = argv, env = { ENOS_CONFIG = "/nonexistent/enos" }, stdout = function() end,
      stderr = function(x) e[#e + 1] = x end }
    return code, table.concat(e)
  end

  it("given twice are refused (exit 2, naming the flag), not the last one silently taken", function()
    local cases = {
      { "device", "--asset-id", "A", "--asset-id", "B", "--new-key", "NEW-00001", "--yes" },
      { "device", "--asset-id", "A", "--new-key", "NEW-00001", "--new-key", "NEW-00002", "--yes" },
      { "device", "--asset-id", "A", "--new-key", "NEW-00001", "--out", "a.json", "--out", "b.json", "--yes" },
      { "batch", "plan.csv", "--journal", "a", "--journal", "b" },
      { "get", "--asset-id", "A", "--endpoint", "https://a", "--endpoint", "https://b" },
      { "config", "--org-id", "a", "--org-id", "b" },
    }
    for _, argv in ipairs(cases) do
      local code, err = run(argv)
      assert.equal(2, code, table.concat(argv, " "))
      local flag = argv[#argv - 1]:match("^%-%-") and argv[#argv - 1] or argv[#argv - 2]
      for i = 2, #argv do if argv[i]:match("^%-%-") and argv[i] ~= "--yes" then
        for j = i + 2, #argv do if argv[j] == argv[i] then flag = argv[i] end end
      end end
      assert.matches("option '" .. flag .. "' must be used at most 1 time", err, 1, true)
    end
  end)
end)

-- (core is loaded for the spec's checks of the C CSV writer below)
describe("the outputs' encoders", function()
  it("write every value the check lets through", function()
    local cols = { "a", "b" }
    for _, v in ipairs { 1e300, -0.0, 2 ^ 53, true, "=1+2", "日本" } do
      assert.is_string(core.csv_row({ a = v, b = "x" }, cols))
      assert.is_string(json.encode { a = v })
    end
    assert.is_string(cjson.encode { 1e300 })
  end)
end)
