-- enos runs inside nginx workers (a forked shell blocks the worker) and on gateway images without a shell:
-- the library never runs one. Proven by running its file and sleep paths (the workflow's private output file,
-- its settle sleep, the profile's mode check, the CLI's output checks, a batch) with os.execute and io.popen
-- replaced by functions that fail the test. (The simulator's launcher, a tool, is the one exception: it is
-- started before they are replaced.)
local H = require "helpers"
local sim = dofile("spec/sim_helper.lua")

local ORG = "o15724268424841"

describe("no shell inside the library", function()
  local h, dir, kp
  local saved_execute, saved_popen
  local shelled = {}
  local function forbid()
    os.execute = function(cmd) shelled[#shelled + 1] = "os.execute " .. tostring(cmd) return nil, "exit", 127 end   -- luacheck: ignore 122
    io.popen = function(cmd) shelled[#shelled + 1] = "io.popen " .. tostring(cmd) return nil, "no shell" end   -- luacheck: ignore 122
  end
  -- the test's own look at the simulator (its helper uses curl): with the shell back for that moment only
  local function allowed(fn, ...)
    os.execute, io.popen = saved_execute, saved_popen     -- luacheck: ignore 122
    local r = fn(...)
    forbid()
    return r
  end
  local function device(asset) return allowed(h.device, h, asset) end
  setup(function()
    kp = H.keypair()
    dir = H.tmpdir()
    local devices = {}
    for i = 1, 6 do
      devices[i] = { productKey = "pk_demo", deviceKey = ("SH-OLD-%02d"):format(i), assetId = ("ASH%05d"):format(i) }
    end
    h = sim.start { config = { devices = devices,
      apps = { { access_key = "ak", secret_key = "sk", public_key_file = kp.public_file } } } }
    H.writefile(dir .. "/plan.csv", "productKey,deviceKey,newDeviceKey\n" ..
      "pk_demo,SH-OLD-03,SH-NEW-03\npk_demo,SH-OLD-04,SH-NEW-04\n")
    H.writefile(dir .. "/plan2.csv", "productKey,deviceKey,newDeviceKey\n" ..
      "pk_demo,SH-OLD-05,SH-NEW-05\npk_demo,SH-OLD-06,SH-NEW-06\n")
    H.sh("mkdir -p " .. dir .. "/home/.config/enos")
    H.writefile(dir .. "/home/.config/enos/config", "[default]\nendpoint = " .. h.url .. "\naccess_key = ak\n" ..
      "secret_key = sk\norg_id = " .. ORG .. "\nprivate_key_file = " .. kp.private_file .. "\n", "644")
    -- from here on, a shell is a failure (recorded, and the call fails as on a gateway without /bin/sh)
    saved_execute, saved_popen = os.execute, io.popen
    forbid()
    for k in pairs(package.loaded) do
      if k == "enos" or k:match("^enos%.") and k ~= "enos.core" then package.loaded[k] = nil end
    end
  end)
  teardown(function()
    os.execute, io.popen = saved_execute, saved_popen     -- luacheck: ignore 122
    if h then h:stop() end
    if dir then os.execute("rm -rf " .. dir) end
  end)

  it("replaces a device with a private output file, from Lua", function()
    local enos = require "enos"
    local workflow = require "enos.workflow"
    local client = assert(enos.client { endpoint = h.url, access_key = "ak", secret_key = "sk", org_id = ORG,
      private_key_file = kp.private_file })
    local report = assert(workflow.replace(client, { productKey = "pk_demo", deviceKey = "SH-OLD-01",
      newDeviceKey = "SH-NEW-01" }, { out = dir .. "/cred1.json", require_secret = true }))
    assert.equal("replaced", report.outcome)
    assert.equal("600", (allowed(H.sh, "stat -c %a " .. dir .. "/cred1.json"):gsub("%s+$", "")))
    assert.truthy(H.readfile(dir .. "/cred1.json"):find(device("ASH00001").deviceSecret, 1, true))
    -- an existing output is refused, not overwritten
    local _, err = workflow.replace(client, { productKey = "pk_demo", deviceKey = "SH-OLD-02",
      newDeviceKey = "SH-NEW-02" }, { out = dir .. "/cred1.json" })
    assert.matches("exists", tostring(err))
    assert.same({}, shelled)
  end)

  it("runs the CLI (profile mode check, output checks) and a batch", function()
    local cli = require "enos.cli"
    local o, e = {}, {}
    local env = { HOME = dir .. "/home" }
    local code = cli.main { argv = { "batch", dir .. "/plan.csv", "--out", dir .. "/creds.csv", "--yes" },
      env = function(k) return env[k] end, isatty = false,
      stdout = function(s) o[#o + 1] = s end, stderr = function(s) e[#e + 1] = s end, stdin = function() end }
    assert.equal(0, code, table.concat(e))
    -- the profile is readable by others: said, from the file's mode read without `stat`
    assert.matches("644", table.concat(e), 1, true)
    assert.equal("SH-NEW-03", device("ASH00003").deviceKey)
    local batch = require "enos.batch"
    local enos = require "enos"
    local client = assert(enos.client { endpoint = h.url, access_key = "ak", secret_key = "sk", org_id = ORG })
    local s = assert(batch.run(client, dir .. "/plan2.csv", { journal = dir .. "/j2", settle_ms = 50 }))
    assert.equal(2, s.done)
    assert.same({}, shelled)
  end)

  it("sleeps without a shell", function()
    local workflow = require "enos.workflow"
    local core = require "enos.core"
    local t0 = core.monotonic_ms()
    workflow.default_sleep(0.12)
    local took = core.monotonic_ms() - t0
    assert.is_true(took >= 120 and took < 1000, "slept " .. took .. " ms")
    assert.same({}, shelled)
  end)
end)
