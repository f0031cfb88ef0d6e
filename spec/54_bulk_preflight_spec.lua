-- Bulk reads and the batch's bulk preflight (`batch --dry-run`), against the simulator: a window of rows is
-- read in one Search Device call; a device counts only when it is exactly the one asked for; values that
-- could break the expression's quotes are read alone; a refused (too long) expression halves the window; a
-- search index that lags writes does not make a device "not found"; every row that would fail is reported
-- with its line, and nothing is changed.
local enos = require "enos"
local bulk = require "enos.bulk"
local preflight = require "enos.preflight"
local cli = require "enos.cli"
local H = require "helpers"
local sim = dofile("spec/sim_helper.lua")

local ORG = "o15724268424841"
local N = 450

local function seed(n)
  local devices = {}
  for i = 1, n do
    devices[i] = { productKey = "pk_demo", deviceKey = ("OLD-%05d"):format(i), assetId = ("A%07d"):format(i) }
  end
  devices[#devices + 1] = { productKey = "pk_demo", deviceKey = "DISABLED-1", assetId = "AOFF0001", status = "disable" }
  devices[#devices + 1] = { productKey = "pk_gateway", deviceKey = "GW-00001", assetId = "AGW00001", }
  devices[#devices + 1] = { productKey = "pk_demo", deviceKey = "TAKEN-01", assetId = "ATAKEN01" }
  return devices
end

-- the calls in the simulator's log since `since`, by operation (token requests apart: once a client)
local function ops(h, since)
  local n = {}
  for _, e in ipairs(h:log(since)) do
    if e.op ~= "token.get" then n[e.op or "?"] = (n[e.op or "?"] or 0) + 1 end
  end
  return n
end

local function calls(h, since)
  local n = 0
  for _, k in pairs(ops(h, since)) do n = n + k end
  return n
end

describe("bulk reads", function()
  local h, c
  setup(function()
    h = sim.start { config = { log_size = 5000, devices = seed(N) } }
    c = assert(enos.client { endpoint = h.url, access_key = "sim-access-key", secret_key = "sim-secret-key",
      org_id = ORG })
  end)
  teardown(function() if h then h:stop() end end)
  before_each(function() h:admin("DELETE", "/faults") end)

  it("reads 450 devices by assetId in 5 calls, each one exactly", function()
    local targets = {}
    for i = 1, N do targets[i] = { assetId = ("A%07d"):format(i) } end
    local _, before = h:log()
    local res, st = bulk.read(c, targets)
    for i = 1, N do
      assert.equal(("A%07d"):format(i), res[i].device.assetId)
      assert.equal(("OLD-%05d"):format(i), res[i].device.deviceKey)
    end
    assert.same({ searches = 5, gets = 0, halvings = 0, calls = 5 }, st)
    assert.same({ search = 5 }, ops(h, before))
  end)

  it("reads by productKey and deviceKey; a missing device gets one Get Device, then is not found", function()
    local targets = { { productKey = "pk_demo", deviceKey = "OLD-00007" }, { productKey = "pk_demo", deviceKey = "NOPE-1" },
      { productKey = "pk_gateway", deviceKey = "GW-00001" } }
    local _, before = h:log()
    local res, st = bulk.read(c, targets)
    assert.equal("A0000007", res[1].device.assetId)
    assert.equal("not_found", res[2].err.kind)
    assert.equal("AGW00001", res[3].device.assetId)
    assert.same({ searches = 2, gets = 1, halvings = 0, calls = 3 }, st)
    assert.same({ search = 2, get = 1 }, ops(h, before))
  end)

  it("never quotes a value that could break out of the expression: it is read alone", function()
    local evil = "A0000001') or assetId in ('A0000002"
    local res, st = bulk.read(c, { { assetId = evil }, { assetId = "A0000003" } })
    assert.equal("not_found", res[1].err.kind)
    assert.equal("A0000003", res[2].device.assetId)
    assert.equal(1, st.gets)
    for _, e in ipairs(h:log()) do
      if e.op == "search" then assert.is_nil(tostring(e.body and e.body.expression):find("or", 1, true)) end
    end
  end)

  it("halves the window when the platform refuses a long expression", function()
    h:admin("POST", "/faults", { search_max_expression = 300 })
    local targets = {}
    for i = 1, 100 do targets[i] = { assetId = ("A%07d"):format(i) } end
    local res, st = bulk.read(c, targets)
    for i = 1, 100 do assert.equal(("A%07d"):format(i), res[i].device.assetId) end
    assert.is_true(st.halvings >= 3, "halvings " .. st.halvings)
    assert.equal(0, st.gets)
  end)

  it("a device the lagging index hides is read with Get Device, not reported missing", function()
    local r = assert(c:replace_device { assetId = "A0000440", newDeviceKey = "LAG-00440" })
    assert.equal("LAG-00440", r.deviceKey)
    h:admin("POST", "/faults", { search_lag_ms = 60000 })
    local res, st = bulk.read(c, { { assetId = "A0000440" }, { assetId = "A0000441" } })
    assert.equal("LAG-00440", res[1].device.deviceKey)
    assert.equal("A0000441", res[2].device.assetId)
    assert.same({ searches = 1, gets = 1, halvings = 0, calls = 2 }, st)
  end)

  it("a reply naming other devices than asked, or one device twice, is not used for them", function()
    -- a stub client whose search answers with a device nobody asked for, one in another product, and two
    -- different devices that both claim to be pk_demo/OLD-00003
    local stub = {
      search_devices = function()
        return { { assetId = "A9999999", productKey = "pk_demo", deviceKey = "OLD-00002" },
          { assetId = "A9999998", productKey = "other", deviceKey = "OLD-00001" },
          { assetId = "A9999997", productKey = "pk_demo", deviceKey = "OLD-00003" },
          { assetId = "A9999996", productKey = "pk_demo", deviceKey = "OLD-00003" } }, { totalSize = 4 }
      end,
      get_device = function(_, p)
        return { assetId = "GET-" .. p.deviceKey, productKey = p.productKey, deviceKey = p.deviceKey }
      end,
    }
    local res, st = bulk.read(stub, { { productKey = "pk_demo", deviceKey = "OLD-00001" },
      { productKey = "pk_demo", deviceKey = "OLD-00003" } })
    assert.equal("GET-OLD-00001", res[1].device.assetId)        -- from the Get Device, not the search
    assert.equal("GET-OLD-00003", res[2].device.assetId)
    assert.equal(2, st.gets)
  end)

  it("a Get Device answered with another device is a protocol error, not that device", function()
    local stub = {
      search_devices = function() return {}, { totalSize = 0 } end,
      get_device = function() return { assetId = "A7777777", productKey = "pk_demo", deviceKey = "OTHER-01" } end,
    }
    local res = bulk.read(stub, { { productKey = "pk_demo", deviceKey = "OLD-00001" } })
    assert.is_nil(res[1].device)
    assert.equal("protocol", res[1].err.kind)
  end)
end)

describe("batch --dry-run: the bulk preflight", function()
  local h, c, dir
  setup(function()
    h = sim.start { config = { log_size = 5000, devices = seed(N) } }
    c = assert(enos.client { endpoint = h.url, access_key = "sim-access-key", secret_key = "sim-secret-key",
      org_id = ORG })
    dir = H.tmpdir()
  end)
  teardown(function() if h then h:stop() end end)

  local function plan_file(name, extra)
    local lines = { "productKey,deviceKey,newDeviceKey" }
    for i = 1, 400 do lines[#lines + 1] = ("pk_demo,OLD-%05d,NEW-%05d"):format(i, i) end
    for _, l in ipairs(extra or {}) do lines[#lines + 1] = l end
    local p = dir .. "/" .. name .. ".csv"
    H.writefile(p, table.concat(lines, "\n") .. "\n")
    return p
  end

  it("a clean 400-row plan: every row would pass, in about one call per 100 rows, nothing changed", function()
    local _, before = h:log()
    local r = assert(preflight.run(c, plan_file("clean")))
    assert.equal(400, r.rows)
    assert.equal(400, r.ok)
    assert.equal(0, r.problem_count)
    assert.equal(8, calls(h, before))                   -- 4 windows: 4 reads + 4 new-key checks
    assert.equal(8, r.calls)
    assert.is_nil(ops(h, before).replaceDevice)
    assert.equal("OLD-00001", h:device("A0000001").deviceKey)
  end)

  it("reports every row that would fail, with its line", function()
    local p = plan_file("bad", {
      "pk_demo,NOPE-0001,NEW-90001",          -- line 402: not found
      "pk_demo,DISABLED-1,NEW-90002",         -- line 403: disabled
      "pk_demo,OLD-00420,TAKEN-01",           -- line 404: new key taken by another asset
      "pk_gateway,GW-00001,GW-NEW-01",             -- line 405: a gateway (a note, not a failure)
      "pk_demo,OLD-00421,OLD-00422",          -- line 406: the new key is another device's current key
    })
    -- line 407: the device of line 11 (pk_demo/OLD-00010) again, by its assetId
    H.writefile(p, H.readfile(p):gsub("productKey,deviceKey,newDeviceKey\n", "assetId,productKey,deviceKey,newDeviceKey\n")
      :gsub("\npk_", "\n,pk_") .. "A0000010,,,NEW-90007\n")
    local _, before = h:log()
    local r = assert(preflight.run(c, p))
    assert.equal(406, r.rows)
    assert.equal(401, r.ok)
    local got = {}
    for _, x in ipairs(r.problems) do got[#got + 1] = x.line .. " " .. x.kind .. ": " .. x.message end
    assert.same({
      "402 not_found: device not found (pk_demo/NOPE-0001)",
      "403 conflict: device AOFF0001 is disabled; enable it before replacing it",
      "404 conflict: newDeviceKey TAKEN-01 is already used by asset ATAKEN01 in product pk_demo",
      "406 conflict: newDeviceKey OLD-00422 is already used by asset A0000422 in product pk_demo",
      "407 invalid_argument: the same device as line 11 (asset A0000010, named another way)",
    }, got)
    assert.equal(1, #r.notes)
    assert.equal(405, r.notes[1].line)
    assert.truthy(r.notes[1].message:find("gateway with 0 sub-device", 1, true))
    assert.is_nil(ops(h, before).replaceDevice)
  end)

  it("enos-replace batch PLAN --dry-run prints the lines and exits 4; a clean plan exits 0", function()
    local p = plan_file("cli", { "pk_demo,DISABLED-1,NEW-91002" })
    local env = { ENOS_ENDPOINT = h.url, ENOS_ACCESS_KEY = "sim-access-key", ENOS_SECRET_KEY = "sim-secret-key",
      ENOS_ORG_ID = ORG, HOME = dir, ENOS_CONFIG = dir .. "/none" }
    local function run(argv)
      local o, e = {}, {}
      local code = cli.main { argv = argv, env = env, stdout = function(s) o[#o + 1] = s end,
        stderr = function(s) e[#e + 1] = s end, isatty = false, stdin = function() return nil end }
      return code, table.concat(o), table.concat(e)
    end
    local _, before = h:log()
    local code, _, text = run { "batch", p, "--dry-run" }
    assert.equal(4, code, text)
    assert.truthy(text:find(p .. ":402: device AOFF0001 is disabled", 1, true), text)
    assert.truthy(text:find("400 of 401 row(s) would pass, 1 would fail", 1, true), text)
    assert.is_nil(ops(h, before).replaceDevice)
    local stdout, mid
    _, mid = h:log()
    code, stdout, text = run { "batch", plan_file("cli-ok"), "--dry-run", "--json", "--read-batch", "200" }
    assert.equal(0, code, text)
    assert.equal(4, calls(h, mid))                  -- 400 rows, 200 a call: 2 reads + 2 new-key checks
    code, _, text = run { "batch", p, "--dry-run", "--read-batch", "201" }
    assert.equal(2, code)
    assert.truthy(text:find("--read-batch must be a whole number 1-200", 1, true), text)
    local j = require("cjson").decode(stdout)
    assert.equal(400, j.pass)
    assert.is_true(j.ok)
    assert.equal(0, j.problem_count)
  end)
end)
