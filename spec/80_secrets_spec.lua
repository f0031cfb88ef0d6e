-- Security pass: with known secret values, run every command and API path and scan everything a
-- person or a log could see — stdout, stderr, errors, tostring, dry-run dumps, journals, results —
-- for the secret key, the token, the private key and every device secret.
local sim = dofile("spec/sim_helper.lua")
local enos = require "enos"
local cli = require "enos.cli"
local batch = require "enos.batch"
local workflow = require "enos.workflow"
local cjson = require "cjson"
local H = require "helpers"

local ORG = "o15724268424841"
local AK, SK = "scan-access-key", "SCAN-secret-key-7f3a9c1e5b"

describe("no secret leaks", function()
  local h, kp, dir
  local seen = {}                        -- everything a person or a log could see
  local function see(what, s) if s ~= nil then seen[#seen + 1] = { what = what, text = tostring(s) } end end

  setup(function()
    kp = H.keypair()
    dir = H.tmpdir()
    local devices = {}
    for i = 1, 12 do
      devices[i] = { productKey = "pk_demo", deviceKey = ("SCAN-%04d"):format(i), assetId = ("S%07d"):format(i),
        deviceSecret = ("OldSecretNumber%05d"):format(i) }
    end
    h = sim.start { tls = true, config = { apps = { { access_key = AK, secret_key = SK, public_key_file = kp.public_file } },
      devices = devices } }
  end)
  teardown(function()
    if h then h:stop() end
    if dir then os.execute("rm -rf " .. dir) end
  end)

  local function client(extra)
    local o = { endpoint = h.url, access_key = AK, secret_key = SK, org_id = ORG, private_key_file = kp.private_file,
      cafile = h.ca_file, timeout = 5 }
    for k, v in pairs(extra or {}) do o[k] = v end
    return assert(enos.client(o))
  end
  local function run_cli(argv)
    local o, e = {}, {}
    local code = cli.main { argv = argv, stdout = function(s) o[#o + 1] = s end, stderr = function(s) e[#e + 1] = s end,
      env = { ENOS_ENDPOINT = h.url, ENOS_ACCESS_KEY = AK, ENOS_SECRET_KEY = SK, ENOS_ORG_ID = ORG,
        ENOS_PRIVATE_KEY_FILE = kp.private_file, ENOS_CA_FILE = h.ca_file, ENOS_CONFIG = dir .. "/none", HOME = dir },
      isatty = false, stdin = function() return nil end }
    see("cli " .. table.concat(argv, " ") .. " stdout", table.concat(o))
    see("cli " .. table.concat(argv, " ") .. " stderr", table.concat(e))
    return code
  end

  it("exercises every path", function()
    local c = client()
    see("tostring(client)", c)
    -- API: success paths and their results
    local r = assert(c:replace_device { assetId = "S0000001", newDeviceKey = "SCAN-N-0001", requireSecret = true })
    assert.is_string(r.deviceSecret)
    see("tostring(replace result)", r)
    local d = assert(c:get_device { assetId = "S0000001", requireSecret = true })
    see("tostring(device)", d)
    see("tostring(prepare)", assert(c:prepare("replace_device", { assetId = "S0000002", newDeviceKey = "SCAN-N-0002" })))
    see("tostring(key)", enos.load_private_key(kp.private_pem))
    -- API: error paths
    local _, e = c:replace_device { assetId = "S0000002", newDeviceKey = "SCAN-0003" }
    see("conflict error", e)
    _, e = client { secret_key = "wrong-" .. SK }:get_device { assetId = "S0000002" }
    see("auth error", e)
    _, e = enos.decrypt_secret { private_key = kp.private_pem, session_key = r.encrypted and r.encrypted.sessionKey or "x",
      secret = "AAAA" }
    see("decrypt error", e)
    h:admin("POST", "/faults", { nonjson_share = 1, count = 1, match = "get" })
    _, e = c:get_device { assetId = "S0000002" }
    see("protocol error", e)
    h:admin("POST", "/faults", { error_share = 1, error_status = 500, count = 1, match = "get" })
    _, e = c:get_device { assetId = "S0000002" }
    see("server error", e)
    -- workflow: dry run, a real run, its report and record
    local rep = assert(workflow.replace(c, { assetId = "S0000002", newDeviceKey = "SCAN-N-0002" }, { dry_run = true }))
    see("dry-run report", rep)
    for _, q in ipairs(rep.requests or {}) do see("dry-run request", q.text) end
    rep = assert(workflow.replace(c, { assetId = "S0000003", newDeviceKey = "SCAN-N-0003" }, { settle_ms = 10 }))
    see("workflow report", rep)
    -- CLI: every command without --show-secret
    run_cli { "config" }
    run_cli { "config", "--json" }
    run_cli { "get", "--asset-id", "S0000004" }
    run_cli { "get", "--asset-id", "S0000004", "--json" }
    run_cli { "get", "--asset-id", "S0000004", "--secret", "--out", dir .. "/g.json" }
    run_cli { "device", "--asset-id", "S0000005", "--new-key", "SCAN-N-0005", "--dry-run" }
    run_cli { "device", "--asset-id", "S0000005", "--new-key", "SCAN-N-0005", "--out", dir .. "/d.json", "--yes" }
    run_cli { "device", "--asset-id", "S0000006", "--new-key", "SCAN-N-0006", "--out", dir .. "/d6.json", "--yes", "--json" }
    run_cli { "device", "--asset-id", "S0000007", "--new-key", "SCAN-0008", "--out", dir .. "/d7.json", "--yes" }
    run_cli { "device", "--asset-id", "S0000007", "--new-key", "SCAN-N-0007", "--out", dir .. "/d7.json", "--yes",
      "--secret-key", "wrong" }
    -- batch: CLI and Lua; its journal and results files
    H.writefile(dir .. "/plan.csv", "assetId,newDeviceKey\nS0000009,SCAN-N-0009\nS0000010,SCAN-N-0010\n")
    run_cli { "batch", dir .. "/plan.csv", "--out", dir .. "/creds.csv", "--yes", "--json" }
    see("batch journal", H.readfile(dir .. "/plan.csv.journal"))
    see("batch results", H.readfile(dir .. "/plan.csv.results.csv"))
    H.writefile(dir .. "/plan2.csv", "assetId,newDeviceKey\nS0000011,SCAN-N-0011\n")
    local s = assert(batch.run(c, dir .. "/plan2.csv", { journal = dir .. "/j2", out = dir .. "/c2.csv" }))
    see("batch summary", cjson.encode(s))
    see("batch journal 2", H.readfile(dir .. "/j2"))
    c:close()
  end)

  it("an endpoint carrying a password or a query token is not echoed (config shows it redacted)", function()
    local url = h.url:gsub("^https://", "https://operator:EndpointPassw0rd@")
    assert.equal(0, run_cli { "config", "--endpoint", url })
    run_cli { "get", "--asset-id", "S0000002", "--endpoint", url }
    run_cli { "get", "--asset-id", "S0000002", "--endpoint", h.url .. "/?token=QueryT0ken" }
    run_cli { "config", "--endpoint", h.url .. "/?token=QueryT0ken" }
    for _, s in ipairs(seen) do
      assert.falsy(s.text:find("EndpointPassw0rd", 1, true), "the endpoint's password appears in " .. s.what)
      assert.falsy(s.text:find("QueryT0ken", 1, true), "the endpoint's query token appears in " .. s.what)
    end
  end)

  it("finds none of them anywhere", function()
    local secrets = { ["secret key"] = SK, token = h:token() }
    -- every line of the private key's base64 body
    local n = 0
    for line in kp.private_pem:gmatch("[^\n]+") do
      if not line:find("-----", 1, true) then n = n + 1 secrets["private key line " .. n] = line end
    end
    -- every device secret the simulator has held or holds
    local _, list = h:admin("GET", "/devices")
    for _, d in ipairs(list.data) do secrets["secret of " .. d.assetId] = d.deviceSecret end
    for i = 1, 12 do secrets["old secret " .. i] = ("OldSecretNumber%05d"):format(i) end
    assert.is_true(#seen > 30)
    for _, s in ipairs(seen) do
      for name, value in pairs(secrets) do
        assert.falsy(s.text:find(value, 1, true), name .. " appears in " .. s.what)
      end
    end
  end)

  it("the files that must hold secrets hold them, with mode 0600", function()
    for _, f in ipairs { "d.json", "d6.json", "g.json", "creds.csv", "c2.csv", "plan.csv.journal", "j2" } do
      assert.equal("600", (H.sh("stat -c %a " .. dir .. "/" .. f):gsub("%s+", "")), f)
    end
    local rec = cjson.decode(H.readfile(dir .. "/d.json"))
    local _, dev = h:admin("GET", "/devices/S0000005")
    assert.equal(dev.data.deviceSecret, rec.deviceSecret)
  end)
end)
