-- What a fleet batch costs the gateway: a real one throttles each application by calls, so the batch reads
-- and verifies devices a window at a time and spends about one call per device (the replace). Counted from the
-- simulator's own request log. And when the bulk reads degrade (a gateway that refuses long expressions, a
-- search index that lags writes), every row still ends right, at a higher price.
local enos = require "enos"
local batch = require "enos.batch"
local cjson = require "cjson"
local H = require "helpers"
local sim = dofile("spec/sim_helper.lua")

local ORG = "o15724268424841"
local N = 3000

local function ops(h, since)
  local n, calls = {}, 0
  for _, e in ipairs(h:log(since)) do
    n[e.op or "?"] = (n[e.op or "?"] or 0) + 1
    if e.op ~= "token.get" then calls = calls + 1 end
  end
  return n, calls
end

describe("batch gateway calls", function()
  local h, kp, dir
  setup(function()
    kp = H.keypair()
    local devices = {}
    for i = 1, N do
      devices[i] = { productKey = "pk_demo", deviceKey = ("OLD-%05d"):format(i), assetId = ("A%07d"):format(i) }
    end
    h = sim.start { workers = 2, config = { log_size = 20000, max_devices_per_product = N + 10, devices = devices,
      apps = { { access_key = "ak", secret_key = "sk", public_key_file = kp.public_file } } } }
    dir = H.tmpdir()
  end)
  teardown(function() if h then h:stop() end end)

  local function client()
    return assert(enos.client { endpoint = h.url, access_key = "ak", secret_key = "sk", org_id = ORG,
      private_key_file = kp.private_file })
  end

  local function plan(name, from, to, old, new)
    local lines = { "productKey,deviceKey,newDeviceKey" }
    for i = from, to do lines[#lines + 1] = ("pk_demo,%s-%05d,%s-%05d"):format(old, i, new, i) end
    local p = dir .. "/" .. name .. ".csv"
    H.writefile(p, table.concat(lines, "\n") .. "\n")
    return p
  end

  for _, rs in ipairs { false, true } do
    it(("3,000 rows, requireSecret %s: at most 1.05 calls a device, every row replaced once"):format(rs and "on" or "off"),
      function()
      local old, new = rs and "R1" or "OLD", rs and "R2" or "R1"
      local _, since = h:log()
      local s = assert(batch.run(client(), plan("p" .. tostring(rs), 1, N, old, new), { concurrency = 64,
        journal = dir .. "/j" .. tostring(rs), out = dir .. "/c" .. tostring(rs) .. ".csv", require_secret = rs,
        settle_ms = 200 }))
      assert.equal(N, s.done)
      local by, calls = ops(h, since)
      assert.equal(N, by.replaceDevice)
      assert.is_true(calls / N <= 1.05, ("%d calls for %d devices: %s"):format(calls, N, cjson.encode(by)))
      assert.equal(new .. "-00001", h:device("A0000001").deviceKey)
      assert.equal(new .. "-03000", h:device("A0003000").deviceKey)
      if rs then          -- and the secrets are the platform's
        local n = 0
        for line in io.lines(dir .. "/ctrue.csv") do
          local cells = require("enos.plan").split_csv(line)
          if cells[2] == "A0000777" then assert.equal(h:device("A0000777").deviceSecret, cells[5]) end
          n = n + 1
        end
        assert.equal(N + 1, n)
      end
    end)
  end

  it("a gateway that refuses long expressions and an index that lags writes: every row right, each read alone",
    function()
    h:admin("POST", "/faults", { search_max_expression = 200, search_lag_ms = 60000 })
    local _, since = h:log()
    local s = assert(batch.run(client(), plan("degraded", 1, 40, "R2", "R3"), { concurrency = 8,
      journal = dir .. "/jdeg", out = dir .. "/cdeg.csv", require_secret = true, settle_ms = 50 }))
    h:admin("DELETE", "/faults")
    assert.equal(40, s.done)
    assert.equal(0, s.failed)
    local by = ops(h, since)
    assert.equal(40, by.replaceDevice)
    -- the lag hides these devices (replaced by the test before) from the preflight's search and the replaced
    -- ones from the verification's: each is read alone, once for each (and one read proves the private key)
    assert.equal(81, by.get)
    assert.is_true(by.search >= 4, "searches " .. tostring(by.search))
    local f = assert(io.open(dir .. "/jdeg"))
    local warned = f:read("*a"):find('"warning"', 1, true)
    f:close()
    assert.is_nil(warned)
    for i = 1, 40 do assert.equal(("R3-%05d"):format(i), h:device(("A%07d"):format(i)).deviceKey) end
  end)
  it("a resume of 1,000 rows a crash left in flight, half of them applied: reconciled a window at a time", function()
    local plan_mod = require "enos.plan"
    -- rows 1001-1500 were replaced by the batch that crashed; 1501-2000 had not left yet
    local applied = plan("applied", 1001, 1500, "R2", "R4")
    assert.equal(500, assert(batch.run(client(), applied, { concurrency = 32, journal = dir .. "/japplied",
      settle_ms = 50 })).done)
    -- the crashed batch's journal: every row "sending" (its record durable, its reply never seen)
    local p = plan("inflight", 1001, 2000, "R2", "R4")
    local fp = assert(plan_mod.snapshot(p))
    os.remove(fp.path)
    local lines = { cjson.encode { t = "batch", plan = p, rows = 1000, plan_size = fp.size, plan_sha256 = fp.sha256 } }
    local reader = assert(plan_mod.open(p))
    local ts = math.floor(require("enos.core").now_ms()) - 60000
    for row in reader:rows() do
      local t = assert(plan_mod.check_row(row.fields))
      local i = tonumber(t.deviceKey:match("%d+$"))
      lines[#lines + 1] = cjson.encode { key = plan_mod.target_key(t), line = row.line, state = "sending",
        assetId = ("A%07d"):format(i), newDeviceKey = t.newDeviceKey, timeout = 1, ts = ts }
    end
    reader:close()
    H.writefile(dir .. "/jinflight", table.concat(lines, "\n") .. "\n", "600")

    local _, since = h:log()
    local s = assert(batch.run(client(), p, { concurrency = 32, journal = dir .. "/jinflight", resume = true,
      out = dir .. "/cinflight.csv", require_secret = true, settle_ms = 50 }))
    assert.equal(1000, s.done)
    assert.equal(500, s.reconciled)
    assert.equal(500, s.replaced)
    local by = ops(h, since)
    assert.equal(500, by.replaceDevice)
    -- ten windows of read-backs, five of preflight reads, five of verification, and the key proof (at most
    -- three plan rows, read by their old keys: gone for the applied ones); no lone read of an in-flight row
    -- (before: one Get Device each, 1,000)
    assert.is_true((by.get or 0) <= 3, "lone reads: " .. cjson.encode(by))
    assert.is_true(by.search <= 25, "searches: " .. cjson.encode(by))
    -- every secret in hand, the platform's
    local n = 0
    for line in io.lines(dir .. "/cinflight.csv") do
      local cells = plan_mod.split_csv(line)
      if cells[1] ~= "line" then
        n = n + 1
        assert.equal(h:device(cells[2]).deviceSecret, cells[5])
        assert.equal(cells[2] <= "A0001500" and "reconciled" or "replaced", cells[8])
      end
    end
    assert.equal(1000, n)
  end)
end)
