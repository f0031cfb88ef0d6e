-- enos.fleet.watch: a replaced fleet watched until it is online, polled in bulk against the simulator, whose
-- device-login endpoint makes a unit online when it logs in with its triple.
local sim = dofile("spec/sim_helper.lua")
local enos = require "enos"
local fleet = require "enos.fleet"
local core = require "enos.core"
local cjson = require "cjson"
local cli = require "enos.cli"
local H = require "helpers"

local ORG = "o15724268424841"
local N = 500

describe("enos.fleet.watch", function()
  local h, secret, easy, kp, dir
  setup(function()
    kp = H.keypair()
    dir = H.tmpdir()
    local devices = {}
    for i = 1, N + 25 do
      devices[i] = { productKey = "pk_demo", deviceKey = ("W-%05d"):format(i), assetId = ("W%07d"):format(i) }
    end
    h = sim.start { config = { devices = devices, log_size = 8000, apps = { { access_key = "sim-access-key",
      secret_key = "sim-secret-key", public_key_file = kp.public_file } } } }
    secret = {}
    local _, list = h:admin("GET", "/devices")
    for _, d in ipairs(list.data) do secret[d.deviceKey] = d.deviceSecret end
    easy = core.easy { timeout = 10 }
  end)
  teardown(function()
    if h then h:stop() end
    if dir then os.execute("rm -rf " .. dir) end
  end)

  local function client()
    return assert(enos.client { endpoint = h.url, access_key = "sim-access-key", secret_key = "sim-secret-key",
      org_id = ORG })
  end
  -- a unit logs in with its triple: the platform shows it online
  local function login(i, dk)
    dk = dk or ("W-%05d"):format(i)
    local ts = string.format("%d", core.now_ms())
    local sign = enos.sha256_hex("clientIdu-" .. dk .. "deviceKey" .. dk .. "productKeypk_demo" .. "timestamp" .. ts
      .. (secret[dk] or h:device(("W%07d"):format(i)).deviceSecret)):upper()
    local res = assert(easy:send { method = "POST", url = h.url .. "/device/login",
      headers = { ["Content-Type"] = "application/json" },
      body = cjson.encode { productKey = "pk_demo", deviceKey = dk, clientId = "u-" .. dk, timestamp = ts, sign = sign } })
    assert.equal(200, res.status, res.body)
  end
  local function searches_since(n)
    local count = 0
    local log = h:log()
    for k = n + 1, #log do if log[k].op == "search" then count = count + 1 end end
    return count
  end

  it("500 devices coming online at random times: polled in bulk, only those not yet online, until all are",
    function()
    local devs, order = {}, {}
    for i = 1, N do
      devs[i] = { assetId = ("W%07d"):format(i), label = "site-" .. (i % 5) }
      order[i] = i
    end
    math.randomseed(7)
    for i = N, 2, -1 do local j = math.random(i) order[i], order[j] = order[j], order[i] end
    local before = #h:log()
    local seen = {}
    local r = assert(fleet.watch(client(), devs, { interval = 0.02, timeout = 120, on_poll = function(s)
      seen[#seen + 1] = { online = s.online, calls = s.calls }
      -- between two polls, a random 60 to 180 more units log in
      for _ = 1, math.random(60, 180) do
        local i = table.remove(order)
        if not i then break end
        login(i)
      end
    end }))
    assert.equal("online", r.outcome)
    assert.equal(N, r.online)
    assert.same({ online = N }, r.counts)
    for site = 0, 4 do assert.same({ total = 100, online = 100 }, r.by_label["site-" .. site]) end
    assert.is_nil(r.oldest)
    assert.is_true(r.polls >= 4, "polls " .. r.polls)
    -- each poll read only the devices not yet online, 200 to a search
    local expect, pending = 0, N
    for k = 1, r.polls do
      expect = expect + math.ceil(pending / 200)
      pending = N - seen[k].online
    end
    assert.equal(expect, r.calls)
    assert.equal(r.calls, searches_since(before))
    assert.is_true(r.calls < r.polls * 3, "later polls read fewer devices")
  end)

  it("stops at the timeout: the devices never online are named, one the platform lacks counts as missing",
    function()
    local devs = {}
    for i = N + 1, N + 10 do devs[#devs + 1] = { productKey = "pk_demo", deviceKey = ("W-%05d"):format(i) } end
    devs[#devs + 1] = { assetId = "NOSUCH01", since = core.now_ms() - 3600 * 1000 }
    for i = N + 1, N + 5 do login(i) end
    local r = assert(fleet.watch(client(), devs, { interval = 0.05, timeout = 0.2 }))
    assert.equal("timeout", r.outcome)
    assert.equal(5, r.online)
    assert.same({ online = 5, inactive = 5, missing = 1 }, r.counts)
    assert.equal("NOSUCH01", r.oldest.device.assetId)          -- replaced an hour ago: the oldest waiting
    assert.is_true(r.oldest.waiting >= 3599, tostring(r.oldest.waiting))
    for k = 1, 10 do assert.equal(k <= 5 and "online" or "inactive", r.devices[k].status) end
  end)

  it("spaces its calls at --qps, and refuses bad input before any request", function()
    local devs = {}
    for i = 1, 450 do devs[i] = { assetId = ("W%07d"):format(i) } end
    local now, slept = 0, {}
    local r = assert(fleet.watch(client(), devs, { qps = 5, timeout = 0, clock = function() return now end,
      sleep = function(s) slept[#slept + 1] = s now = now + s * 1000 end }))
    assert.equal(3, r.calls)                                   -- 450 devices: 200 + 200 + 50
    assert.same({ 0.2, 0.2 }, slept)                           -- 5 a second: 200 ms apart
    local before = #h:log()
    for _, bad in ipairs {
      { {}, "no devices" }, { { { deviceKey = "x" } }, "needs assetId, or productKey and deviceKey" },
      { "x", "devices must be a list" },
    } do
      local res, err = fleet.watch(client(), bad[1])
      assert.is_nil(res)
      assert.equal("invalid_argument", err.kind)
      assert.matches(bad[2], err.message, 1, true)
    end
    local res, err = fleet.watch(client(), devs, { window = 500 })
    assert.is_nil(res)
    assert.matches("window must be an integer 1-200", err.message, 1, true)
    assert.equal(before, #h:log())
  end)

  it("enos-replace watch: from a batch's results file (by a plan column), its journal, or the plan", function()
    local plan = dir .. "/plan.csv"
    local f = assert(io.open(plan, "w"))
    f:write("productKey,deviceKey,newDeviceKey,crew\n")
    for i = N + 11, N + 20 do f:write(("pk_demo,W-%05d,NEW-%05d,crew-%d\n"):format(i, i, i % 2)) end
    f:close()
    local function run(argv)
      local o, e = {}, {}
      local code = cli.main { argv = argv, env = { ENOS_ENDPOINT = h.url, ENOS_ACCESS_KEY = "sim-access-key",
        ENOS_SECRET_KEY = "sim-secret-key", ENOS_ORG_ID = ORG, ENOS_PRIVATE_KEY_FILE = kp.private_file,
        ENOS_CONFIG = dir .. "/none", HOME = dir }, stdout = function(s) o[#o + 1] = s end,
        stderr = function(s) e[#e + 1] = s end }
      return code, table.concat(o), table.concat(e)
    end
    local code, _, err = run { "batch", plan, "--out", dir .. "/creds.csv", "--yes" }
    assert.equal(0, code, err)
    -- six of the ten new units log in with their new triple
    for i = N + 11, N + 16 do login(i, ("NEW-%05d"):format(i)) end
    code, _, err = run { "watch", plan .. ".results.csv", "--by", "crew", "--wait", "0.3", "--interval", "0.1" }
    assert.equal(7, code, err)
    assert.matches("6/10 online  inactive 4", err, 1, true)
    assert.matches("[crew-0 3/5, crew-1 3/5]", err, 1, true)
    assert.matches("4 of 10 device(s) not online after", err, 1, true)
    for i = N + 17, N + 20 do
      assert.matches(("W%07d (inactive)"):format(i), err, 1, true)
      login(i, ("NEW-%05d"):format(i))
    end
    code, _, err = run { "watch", plan .. ".journal", "--interval", "0.1" }
    assert.equal(0, code, err)
    assert.matches("all 10 device(s) online", err, 1, true)
    local out
    code, out, err = run { "watch", plan, "--json", "--by", "crew" }
    assert.equal(0, code, err)
    local last = cjson.decode(out:match("([^\n]+)\n$"))
    assert.same({ true, "online", 10, 10 }, { last.final, last.outcome, last.online, last.total })
    assert.same({ total = 5, online = 5 }, last.by_label["crew-1"])
    -- batch --wait-active: the same watch after the run; the new units not online yet: exit 7
    local plan2 = dir .. "/plan2.csv"
    H.writefile(plan2, "productKey,deviceKey,newDeviceKey\npk_demo,W-00521,NEW-00521\npk_demo,W-00522,NEW-00522\n")
    code, _, err = run { "batch", plan2, "--out", dir .. "/creds2.csv", "--yes", "--wait-active", "0.3" }
    assert.equal(7, code, err)
    assert.matches("2 row(s): 2 done", err, 1, true)
    assert.matches("2 of 2 device(s) not online after", err, 1, true)
    code, _, err = run { "batch", plan2, "--check", "--wait-active", "5" }
    assert.equal(2, code)
    assert.matches("--wait-active goes with a run", err, 1, true)
    -- the journal has no plan columns; a file that names no device is refused
    code, _, err = run { "watch", plan .. ".journal", "--by", "crew" }
    assert.equal(2, code)
    assert.matches("a journal has no plan columns", err, 1, true)
    H.writefile(dir .. "/empty.csv", "productKey,deviceKey,newDeviceKey\n")
    code, _, err = run { "watch", dir .. "/empty.csv" }
    assert.equal(2, code)
    assert.matches("names no replaced device", err, 1, true)
  end)
end)
