-- After the replace, against the simulator, from the CLI: sub-devices behind a gateway (the link, the
-- per-gateway files, the watch that names the gateway to fix), tags and the audit, certificate devices (the
-- old unit's certificate refused, the new one logging in), and a batch whose steps after the replace fail
-- and are finished by --resume.
local sim = dofile("spec/sim_helper.lua")
local cli = require "enos.cli"
local cjson = require "cjson"
local H = require "helpers"

local ORG = "o15724268424841"
local AK, SK = "after-ak", "after-secret-key-never-printed"

describe("after the replace (simulator, CLI)", function()
  local h, kp, dir
  setup(function()
    kp = H.keypair()
    dir = H.tmpdir()
    local devices = {
      { productKey = "pk_gateway", deviceKey = "GW-1", assetId = "GW000001" },
      { productKey = "pk_gateway", deviceKey = "GW-2", assetId = "GW000002" },
    }
    for i = 1, 40 do
      devices[#devices + 1] = { productKey = "pk_demo", deviceKey = ("S-OLD-%03d"):format(i),
        assetId = ("S%07d"):format(i), gateway = i <= 4 and "GW000001" or (i <= 6 and "GW000002" or nil) }
    end
    h = sim.start { config = { apps = { { access_key = AK, secret_key = SK, public_key_file = kp.public_file } },
      devices = devices, log_size = 5000 } }
  end)
  teardown(function()
    if h then h:stop() end
    if dir then os.execute("rm -rf " .. dir) end
  end)

  local function env(extra)
    local e = { ENOS_ENDPOINT = h.url, ENOS_ACCESS_KEY = AK, ENOS_SECRET_KEY = SK, ENOS_ORG_ID = ORG,
      ENOS_PRIVATE_KEY_FILE = kp.private_file, HOME = dir, ENOS_CONFIG = dir .. "/none" }
    for k, v in pairs(extra or {}) do e[k] = v end
    return e
  end
  local function run(argv)
    local o, e = {}, {}
    local code = cli.main { argv = argv, env = env(), stdout = function(s) o[#o + 1] = s end,
      stderr = function(s) e[#e + 1] = s end, isatty = false, stdin = function() return nil end,
      sleep = function() end }
    return code, table.concat(o), table.concat(e)
  end
  local function plan(name, rows)
    local p = dir .. "/" .. name
    local lines = { "productKey,deviceKey,newDeviceKey,site" }
    for _, r in ipairs(rows) do lines[#lines + 1] = table.concat(r, ",") end
    H.writefile(p, table.concat(lines, "\n") .. "\n")
    return p
  end
  local function ops_since(n)
    local count = {}
    local log = h:log()
    for k = n + 1, #log do count[log[k].op] = (count[log[k].op] or 0) + 1 end
    return count
  end
  local function csv_rows(path)
    local rows, header = {}, nil
    for line in io.lines(path) do
      local cells = require("enos.plan").split_csv(line)
      if not header then header = cells else
        local r = {}
        for i, name in ipairs(header) do r[name] = cells[i] end
        rows[#rows + 1] = r
      end
    end
    return rows, header
  end

  describe("sub-devices behind a gateway", function()
    it("batch --subdevices: the link checked, the gateway in the credentials, one 0600 file per gateway", function()
      local p = plan("subs.csv", {
        { "pk_demo", "S-OLD-001", "S-NEW-001", "north" }, { "pk_demo", "S-OLD-002", "S-NEW-002", "north" },
        { "pk_demo", "S-OLD-005", "S-NEW-005", "south" }, { "pk_demo", "S-OLD-010", "S-NEW-010", "south" },
      })
      local creds = dir .. "/subs-creds.csv"
      local before = #h:log()
      local code, _, err = run { "batch", p, "--out", creds, "--subdevices", "--yes" }
      assert.equal(0, code, err)
      local ops = ops_since(before)
      assert.equal(4, ops.replaceDevice)
      assert.equal(4 + 3, ops.getGateway)           -- each row once; each sub-device once more, after
      assert.is_nil(ops.addSubDevice)               -- the simulator's replace keeps the link
      local rows = csv_rows(creds)
      local by = {}
      for _, r in ipairs(rows) do by[r.deviceKey] = r end
      assert.equal("GW000001", by["S-NEW-001"].gatewayAssetId)
      assert.equal("GW-1", by["S-NEW-001"].gatewayDeviceKey)
      assert.equal("GW000002", by["S-NEW-005"].gatewayAssetId)
      assert.equal("", by["S-NEW-010"].gatewayAssetId or "")
      assert.matches("per%-gateway files", err)
      local g1 = dir .. "/subs-creds.gateway-GW000001.csv"
      local g2 = dir .. "/subs-creds.gateway-GW000002.csv"
      assert.equal("600", H.sh("stat -c %a " .. g1):match("%d+"))
      local r1 = csv_rows(g1)
      assert.equal(2, #r1)
      local keys = { r1[1].deviceKey, r1[2].deviceKey }
      table.sort(keys)
      assert.same({ "S-NEW-001", "S-NEW-002" }, keys)
      for _, r in ipairs(r1) do
        assert.equal(h:device(r.assetId).deviceSecret, r.deviceSecret)
        assert.equal("GW-1", r.gatewayDeviceKey)
      end
      assert.equal(1, #csv_rows(g2))
      assert.is_nil(io.open(dir .. "/subs-creds.gateway-.csv"))
      -- the journal names each sub-device's gateway
      local j = H.readfile(p .. ".journal")
      assert.matches('"gateway":{[^}]*"assetId":"GW000001"', j)
    end)
  end)
end)
