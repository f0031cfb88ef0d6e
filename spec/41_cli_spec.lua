-- enos-replace and enos.workflow against the simulator (real nginx, TLS, real libcurl transport).
-- The CLI runs in-process through enos.cli.main (argv, env, captured stdout/stderr), and a few cases
-- run the real bin/enos-replace as a subprocess.
local sim = dofile("spec/sim_helper.lua")
local cli = require "enos.cli"
local core = require "enos.core"
local cjson = require "cjson"
local H = require "helpers"

local ORG = "o15724268424841"
local AK, SK = "cli-access-key-0001", "cli-secret-key-do-not-print"
local TOPO = "/connect-service/v2.4/device-topos"

describe("enos-replace against the simulator", function()
  local h, kp, dir
  local captured = {}          -- every stdout/stderr the secret scan must check
  local seq = 0

  setup(function()
    kp = H.keypair()
    dir = H.tmpdir()
    h = sim.start { tls = true, config = {
      apps = { { access_key = AK, secret_key = SK, public_key_file = kp.public_file } },
      orgs = { ORG },
    } }
  end)
  teardown(function()
    if h then h:stop() end
    if dir then os.execute("rm -rf " .. dir) end
  end)
  local seen_secrets = {}
  before_each(function()
    assert.equal(200, (h:admin("POST", "/reset")))
  end)
  after_each(function()
    -- remember every device secret the simulator holds, for the final scan
    for _, d in ipairs(select(2, h:admin("GET", "/devices")).data or {}) do seen_secrets[d.deviceSecret] = true end
  end)

  local function seed(d) return h:seed(d) end
  local function device(asset) return h:device(asset) end
  local function replaces()
    local n = 0
    for _, e in ipairs(h:log()) do if e.op == "replaceDevice" then n = n + 1 end end
    return n
  end
  local function newpath(name)
    seq = seq + 1
    return dir .. "/" .. seq .. "-" .. name
  end

  local BASE_ENV
  local function env(extra)
    local e = { HOME = dir .. "/home-none", ENOS_ENDPOINT = h.url, ENOS_ACCESS_KEY = AK, ENOS_SECRET_KEY = SK,
      ENOS_ORG_ID = ORG, ENOS_CA_FILE = h.ca_file, ENOS_PRIVATE_KEY_FILE = kp.private_file }
    for k, v in pairs(extra or {}) do if v == false then e[k] = nil else e[k] = v end end
    return e
  end
  BASE_ENV = env

  -- Runs the CLI in-process. opts: env, isatty, stdin (list of lines), sleep, clock, client_options, scan (false
  -- when the output legitimately holds a secret).
  local function run(argv, opts)
    opts = opts or {}
    local o, e = {}, {}
    local lines = opts.stdin or {}
    local code = cli.main {
      argv = argv, env = opts.env or BASE_ENV(), isatty = opts.isatty or false,
      stdout = function(s) o[#o + 1] = s end, stderr = function(s) e[#e + 1] = s end,
      stdin = function() return table.remove(lines, 1) end,
      sleep = opts.sleep or function() end, clock = opts.clock, client_options = opts.client_options,
    }
    local res = { code = code, out = table.concat(o), err = table.concat(e) }
    if opts.scan ~= false then captured[#captured + 1] = res.out .. "\n" .. res.err end
    return res
  end
  local function json_of(res)
    local ok, v = pcall(cjson.decode, res.out)
    assert(ok, "stdout is not JSON: " .. res.out .. "\nstderr: " .. res.err)
    return v
  end

  describe("device", function()
    it("replaces by assetId, writes the secret to a 0600 file and not to the terminal", function()
      local d = seed { productKey = "pk_demo", deviceKey = "cli_old_01", status = "online" }
      local out = newpath("cred.json")
      local r = run { "device", "--asset-id", d.assetId, "--new-key", "cli_new_01", "--out", out, "--yes" }
      assert.equal(0, r.code, r.err)
      local now = device(d.assetId)
      assert.equal("cli_new_01", now.deviceKey)
      assert.equal("inactive", now.status)
      assert.equal("600", (H.sh("stat -c %a " .. out):gsub("%s", "")))
      local rec = cjson.decode(H.readfile(out))
      assert.equal(now.deviceSecret, rec.deviceSecret)
      assert.equal(d.assetId, rec.assetId)
      assert.equal("cli_new_01", rec.deviceKey)
      assert.matches("Replaced: asset " .. d.assetId, r.out, 1, true)
      assert.matches("cli_old_01 -> cli_new_01", r.out, 1, true)
      assert.matches("written to " .. out, r.out, 1, true)
      assert.matches("About to replace", r.err, 1, true)          -- the plan, even with --yes
      assert.not_matches(now.deviceSecret, r.out .. r.err, 1, true)
      -- the new credentials work
      local st = h:login("pk_demo", "cli_new_01", rec.deviceSecret)
      assert.equal(200, st)
    end)

    it("replaces by productKey+deviceKey; --json --show-secret carries the decrypted secret", function()
      local d = seed { productKey = "pk_demo", deviceKey = "cli_old_02" }
      local r = run({ "device", "--product-key", "pk_demo", "--device-key", "cli_old_02", "--new-key", "cli_new_02",
        "--yes", "--json", "--show-secret" }, { scan = false })
      assert.equal(0, r.code, r.err)
      local v = json_of(r)
      assert.is_true(v.ok)
      assert.equal("replaced", v.outcome)
      assert.equal(0, v.exit_code)
      assert.equal(device(d.assetId).deviceSecret, v.new.deviceSecret)
      assert.equal("clear", v.secret.obtained)
      assert.equal("cli_old_02", v.old.deviceKey)
      assert.equal("inactive", v.new.status)
    end)

    it("with --no-secret does not ask for the secret and needs no --out", function()
      local d = seed { productKey = "pk_demo", deviceKey = "cli_old_03" }
      local r = run { "device", "--asset-id", d.assetId, "--new-key", "cli_new_03", "--no-secret", "--yes", "--json" }
      assert.equal(0, r.code, r.err)
      assert.equal("none", json_of(r).secret.obtained)
      local body
      for _, e in ipairs(h:log()) do if e.op == "replaceDevice" then body = e.body end end
      assert.is_nil(body.requireSecret)
    end)

    it("refuses to run without a place for the secret (exit 2), changing nothing", function()
      local d = seed { productKey = "pk_demo", deviceKey = "cli_old_04" }
      local r = run { "device", "--asset-id", d.assetId, "--new-key", "cli_new_04", "--yes" }
      assert.equal(2, r.code)
      assert.matches("needs somewhere to go", r.err)
      assert.equal(0, #h:log())
    end)

    local refusals = {
      { "a missing device", function() return "NoSuchAsset1", "cli_new_x" end, "not found" },
      { "a disabled device", function() return seed { productKey = "pk_demo", deviceKey = "cli_dis", status = "disable" }.assetId,
        "cli_new_x" end, "disabled" },
      { "a mirror device", function() return seed { productKey = "pk_demo", deviceKey = "cli_mir", status = "mirror" }.assetId,
        "cli_new_x" end, "mirror" },
      { "the same key", function() return seed { productKey = "pk_demo", deviceKey = "cli_same" }.assetId, "cli_same" end,
        "equals" },
      { "a key already taken", function()
        seed { productKey = "pk_demo", deviceKey = "cli_taken" }
        return seed { productKey = "pk_demo", deviceKey = "cli_other" }.assetId, "cli_taken" end, "already used" },
    }
    for _, case in ipairs(refusals) do
      it("refuses " .. case[1] .. " with exit 4 and changes nothing", function()
        local asset, newkey = case[2]()
        local before = select(2, h:admin("GET", "/devices")).data
        local r = run { "device", "--asset-id", asset, "--new-key", newkey, "--out", newpath("x.json"), "--yes", "--json" }
        assert.equal(4, r.code, r.err)
        assert.matches(case[3], r.err, 1, true)
        assert.matches("Nothing was changed", r.err, 1, true)
        local v = json_of(r)
        assert.is_false(v.ok)
        assert.equal("preflight", v.error.step)
        assert.equal(0, replaces())
        local after = select(2, h:admin("GET", "/devices")).data
        assert.same(before, after)
      end)
    end

    it("an ambiguous drop (applied, then the connection closed) ends reconciled with the right secret", function()
      local d = seed { productKey = "pk_demo", deviceKey = "cli_old_05" }
      h:admin("POST", "/faults", { ambiguous_share = 1, match = "replaceDevice", count = 1 })
      local out = newpath("cred.json")
      local r = run { "device", "--asset-id", d.assetId, "--new-key", "cli_new_05", "--out", out, "--yes", "--json" }
      assert.equal(0, r.code, r.err)
      local v = json_of(r)
      assert.equal("reconciled", v.outcome)
      assert.equal(1, replaces())
      local rec = cjson.decode(H.readfile(out))
      assert.equal(device(d.assetId).deviceSecret, rec.deviceSecret)
      assert.equal("reconciled", rec.outcome)
      assert.equal(200, (h:login("pk_demo", "cli_new_05", rec.deviceSecret)))
    end)

    it("a 500 before applying: read back, retry, success", function()
      local d = seed { productKey = "pk_demo", deviceKey = "cli_old_06" }
      h:admin("POST", "/faults", { error_share = 1, error_status = 500, match = "replaceDevice", count = 1 })
      local r = run { "device", "--asset-id", d.assetId, "--new-key", "cli_new_06", "--out", newpath("c.json"),
        "--yes", "--json" }
      assert.equal(0, r.code, r.err)
      local v = json_of(r)
      assert.equal("replaced", v.outcome)
      assert.equal(2, v.attempts)
      assert.equal(2, replaces())
      assert.equal("cli_new_06", device(d.assetId).deviceKey)
    end)

    it("a 503 storm fails cleanly within the retry bound (exit 5), device unchanged", function()
      local d = seed { productKey = "pk_demo", deviceKey = "cli_old_07" }
      h:admin("POST", "/faults", { error_share = 1, error_status = 503, match = "replaceDevice" })
      local r = run { "device", "--asset-id", d.assetId, "--new-key", "cli_new_07", "--out", newpath("c.json"),
        "--yes", "--max-attempts", "4" }
      assert.equal(5, r.code, r.err)
      assert.equal(4, replaces())
      assert.equal("cli_old_07", device(d.assetId).deviceKey)
      assert.matches("device unchanged", r.err)
      assert.matches("Nothing was changed", r.err)
    end)

    it("a short 503 storm ends in success within the retry bound", function()
      local d = seed { productKey = "pk_demo", deviceKey = "cli_old_16" }
      h:admin("POST", "/faults", { error_share = 1, error_status = 503, match = "replaceDevice", count = 2 })
      local r = run { "device", "--asset-id", d.assetId, "--new-key", "cli_new_16", "--out", newpath("c.json"),
        "--yes", "--json" }
      assert.equal(0, r.code, r.err)
      assert.equal(3, json_of(r).attempts)
      assert.equal("cli_new_16", device(d.assetId).deviceKey)
    end)

    it("a timeout while the platform applies the replace ends reconciled (real settle pause)", function()
      local d = seed { productKey = "pk_demo", deviceKey = "cli_old_17" }
      h:admin("POST", "/faults", { latency_ms = 1500, match = "replaceDevice", count = 1 })
      local out = newpath("c.json")
      local r = run({ "device", "--asset-id", d.assetId, "--new-key", "cli_new_17", "--out", out, "--yes", "--json",
        "--timeout", "1" }, { sleep = require("enos.workflow").default_sleep })
      assert.equal(0, r.code, r.err)
      local v = json_of(r)
      assert.equal("reconciled", v.outcome)
      assert.matches("timeout", v.steps[2].detail)
      assert.equal(device(d.assetId).deviceSecret, cjson.decode(H.readfile(out)).deviceSecret)
    end)

    it("in V2.1 mode reads the clear secret from the reply", function()
      local d = seed { productKey = "pk_demo", deviceKey = "cli_old_18" }
      local out = newpath("c.json")
      local r = run({ "device", "--asset-id", d.assetId, "--new-key", "cli_new_18", "--out", out, "--yes",
        "--api-version", "v2.1" }, { env = env { ENOS_PRIVATE_KEY_FILE = false } })
      assert.equal(0, r.code, r.err)
      assert.equal(device(d.assetId).deviceSecret, cjson.decode(H.readfile(out)).deviceSecret)
      local path
      for _, e in ipairs(h:log()) do if e.op == "replaceDevice" then path = e.path end end
      assert.equal("/connect-service/v2.1/devices", path)
    end)

    it("without a private key (V2.4) the secret is not requested and the output says why", function()
      local d = seed { productKey = "pk_demo", deviceKey = "cli_old_19" }
      local r = run({ "device", "--asset-id", d.assetId, "--new-key", "cli_new_19", "--yes" },
        { env = env { ENOS_PRIVATE_KEY_FILE = false } })
      assert.equal(0, r.code, r.err)
      assert.matches("no private key configured", r.out)
      assert.matches("not requested", r.out)
    end)

    it("--out or --show-secret without a private key (V2.4) is refused before anything is sent: " ..
      "the secret asked for could not be had", function()
      local d = seed { productKey = "pk_demo", deviceKey = "cli_old_19b" }
      for _, extra in ipairs { { "--out", dir .. "/nokey.json" }, { "--show-secret" } } do
        local argv = { "device", "--asset-id", d.assetId, "--new-key", "cli_new_19b", "--yes" }
        for _, a in ipairs(extra) do argv[#argv + 1] = a end
        local r = run(argv, { env = env { ENOS_PRIVATE_KEY_FILE = false } })
        assert.equal(2, r.code, r.err)
        assert.matches("no private key is configured", r.err)
        assert.matches("%-%-no%-secret", r.err)
      end
      assert.equal("cli_old_19b", device(d.assetId).deviceKey)
      assert.is_nil(io.open(dir .. "/nokey.json"))
      local r = run({ "device", "--asset-id", d.assetId, "--new-key", "cli_new_19b", "--yes", "--no-secret",
        "--show-secret" }, { env = env { ENOS_PRIVATE_KEY_FILE = false } })
      assert.equal(2, r.code)
      assert.matches("contradict", r.err)
    end)

    -- a real transport with a hook run on each reply
    local function hooked(hook)
      local inner = core.easy { cafile = h.ca_file, timeout = 10 }
      return { send = function(_, req)
        local res, err = inner:send(req)
        if res then res = hook(req, res) or res end
        return res, err
      end, close = function() inner:close() end }
    end

    it("exit 6 when verification fails after the replace (the secret is still delivered)", function()
      local d = seed { productKey = "pk_demo", deviceKey = "cli_old_20" }
      local replaced = false
      local t = hooked(function(req, res)
        if req.url:find("action=replaceDevice", 1, true) then replaced = true end
        if replaced and req.url:find("action=get", 1, true) then   -- the platform reads back inconsistently
          res.body = res.body:gsub('"status":"inactive"', '"status":"disable"')
        end
      end)
      local out = newpath("c.json")
      local r = run({ "device", "--asset-id", d.assetId, "--new-key", "cli_new_20", "--out", out, "--yes", "--json" },
        { client_options = { transport = t } })
      t.close()
      assert.equal(6, r.code, r.err)
      local v = json_of(r)
      assert.is_false(v.ok)
      assert.equal("replaced", v.outcome)
      assert.equal("verify", v.error.step)
      assert.matches("the replace happened but", r.err)
      assert.equal(device(d.assetId).deviceSecret, cjson.decode(H.readfile(out)).deviceSecret)
    end)

    it("exit 6 when the secret file cannot be written after the replace; the record is printed instead", function()
      local d = seed { productKey = "pk_demo", deviceKey = "cli_old_21" }
      local sub = newpath("vanishing")
      H.sh("mkdir " .. sub)
      local t = hooked(function(req)
        if req.url:find("action=replaceDevice", 1, true) then H.sh("rmdir " .. sub .. " && touch " .. sub) end
      end)
      local r = run({ "device", "--asset-id", d.assetId, "--new-key", "cli_new_21", "--out", sub .. "/c.json", "--yes" },
        { client_options = { transport = t }, scan = false })
      t.close()
      assert.equal(6, r.code, r.err)
      assert.matches("so the secret is not lost", r.err)
      assert.matches(device(d.assetId).deviceSecret, r.out, 1, true)
    end)

    it("a gateway keeps its sub-devices; the ones dropped mid-flight are re-attached", function()
      local gw = seed { productKey = "pk_gateway", deviceKey = "cli_gw_old" }
      local s1 = seed { productKey = "pk_demo", deviceKey = "cli_sub_1", gateway = gw.assetId }
      local s2 = seed { productKey = "pk_demo", deviceKey = "cli_sub_2", gateway = gw.assetId }
      local inner = core.easy { cafile = h.ca_file, timeout = 10 }
      local transport = { send = function(_, req)
        local res, err = inner:send(req)
        if res and req.url:find("action=replaceDevice", 1, true) then
          local st = h:call("POST", TOPO, { action = "removeSubDevice", orgId = ORG },
            { gateway = { assetId = gw.assetId }, subDevices = { { assetId = s2.assetId } } })
          assert.equal(200, st)
        end
        return res, err
      end }
      local r = run({ "device", "--asset-id", gw.assetId, "--new-key", "cli_gw_new", "--out", newpath("gw.json"),
        "--yes", "--json" }, { client_options = { transport = transport } })
      inner:close()
      assert.equal(0, r.code, r.err)
      local v = json_of(r)
      assert.same({ before = 2, after = 2, reattached = 1 }, v.subdevices)
      assert.equal(gw.assetId, device(s1.assetId).gateway)
      assert.equal(gw.assetId, device(s2.assetId).gateway)
      assert.matches("re%-attaching", table.concat(v.warnings, " "))
    end)

    it("a gateway whose sub-devices stay needs no re-attach", function()
      local gw = seed { productKey = "pk_gateway", deviceKey = "cli_gw2_old" }
      seed { productKey = "pk_demo", deviceKey = "cli_sub_3", gateway = gw.assetId }
      local r = run { "device", "--asset-id", gw.assetId, "--new-key", "cli_gw2_new", "--no-secret", "--yes", "--json" }
      assert.equal(0, r.code, r.err)
      assert.same({ before = 1, after = 1, reattached = 0 }, json_of(r).subdevices)
      for _, e in ipairs(h:log()) do assert.not_equal("addSubDevice", e.op) end
    end)

    it("refuses to overwrite an existing --out file (exit 2) and changes nothing; --overwrite replaces it", function()
      local d = seed { productKey = "pk_demo", deviceKey = "cli_old_08" }
      local out = newpath("exists.json")
      H.writefile(out, "precious")
      local r = run { "device", "--asset-id", d.assetId, "--new-key", "cli_new_08", "--out", out, "--yes" }
      assert.equal(2, r.code)
      assert.matches("exists", r.err)
      assert.equal("precious", H.readfile(out))
      assert.equal(0, replaces())
      r = run { "device", "--asset-id", d.assetId, "--new-key", "cli_new_08", "--out", out, "--overwrite", "--yes" }
      assert.equal(0, r.code, r.err)
      assert.equal(device(d.assetId).deviceSecret, cjson.decode(H.readfile(out)).deviceSecret)
      assert.equal("600", (H.sh("stat -c %a " .. out):gsub("%s", "")))
    end)

    it("writes env and text formats", function()
      local d = seed { productKey = "pk_demo", deviceKey = "cli_old_09" }
      local out = newpath("cred.env")
      local r = run { "device", "--asset-id", d.assetId, "--new-key", "cli_new_09", "--out", out, "--format", "env", "--yes" }
      assert.equal(0, r.code, r.err)
      local text = H.readfile(out)
      assert.matches("ENOS_DEVICE_SECRET=" .. device(d.assetId).deviceSecret, text, 1, true)
      assert.matches("ENOS_DEVICE_KEY=cli_new_09", text, 1, true)
    end)

    it("--wait-active succeeds once the new device logs in", function()
      local d = seed { productKey = "pk_demo", deviceKey = "cli_old_10" }
      local out = newpath("cred.json")
      local logged
      local function sleep()
        if not logged then
          local rec = cjson.decode(H.readfile(out))
          assert.equal(200, (h:login(rec.productKey, rec.deviceKey, rec.deviceSecret)))
          logged = true
        end
      end
      local r = run({ "device", "--asset-id", d.assetId, "--new-key", "cli_new_10", "--out", out, "--yes", "--json",
        "--wait-active", "60" }, { sleep = sleep })
      assert.equal(0, r.code, r.err)
      local v = json_of(r)
      assert.is_true(v.wait.online)
      assert.is_true(logged)
      assert.equal("online", device(d.assetId).status)
    end)

    it("--wait-active that runs out exits 7 (done, not online)", function()
      local d = seed { productKey = "pk_demo", deviceKey = "cli_old_11" }
      local t = 0
      local r = run({ "device", "--asset-id", d.assetId, "--new-key", "cli_new_11", "--out", newpath("c.json"),
        "--yes", "--wait-active", "5" }, { clock = function() return t end, sleep = function(s) t = t + s * 1000 end })
      assert.equal(7, r.code, r.err)
      assert.matches("did not come online", r.err)
      assert.matches("NO: not within 5 s", r.out, 1, true)
      assert.equal("cli_new_11", device(d.assetId).deviceKey)
    end)

    it("--dry-run sends no replace and shows redacted signed requests", function()
      local d = seed { productKey = "pk_demo", deviceKey = "cli_old_12" }
      local r = run { "device", "--asset-id", d.assetId, "--new-key", "cli_new_12", "--dry-run" }
      assert.equal(0, r.code, r.err)
      assert.equal(0, replaces())
      -- reads only: the device, the free-key search, its gateway, its certificates
      for _, e in ipairs(h:log()) do
        assert.is_true(e.op == "get" or e.op == "search" or e.op == "token.get" or e.op == "getGateway" or
          tostring(e.op):match("list$") ~= nil, e.op)
      end
      assert.equal("cli_old_12", device(d.assetId).deviceKey)
      assert.matches("Dry run", r.out)
      assert.matches("action=replaceDevice", r.out, 1, true)
      assert.matches("apim-signature: <redacted>", r.out, 1, true)
      assert.matches('"requireSecret":true', r.out, 1, true)
    end)

    it("refuses without a terminal and without --yes (exit 2) before any request", function()
      local d = seed { productKey = "pk_demo", deviceKey = "cli_old_13" }
      local r = run { "device", "--asset-id", d.assetId, "--new-key", "cli_new_13", "--out", newpath("c.json") }
      assert.equal(2, r.code)
      assert.matches("stdin is not a terminal", r.err)
      assert.equal(0, #h:log())
    end)

    it("asks on a terminal: 'n' aborts (exit 1, nothing changed), 'y' proceeds", function()
      local d = seed { productKey = "pk_demo", deviceKey = "cli_old_14" }
      local r = run({ "device", "--asset-id", d.assetId, "--new-key", "cli_new_14", "--out", newpath("c.json") },
        { isatty = true, stdin = { "n" } })
      assert.equal(1, r.code)
      assert.matches("Proceed? [y/N]", r.err, 1, true)
      assert.matches("cli_old_14  ->  cli_new_14", r.err, 1, true)
      assert.equal(0, replaces())
      r = run({ "device", "--asset-id", d.assetId, "--new-key", "cli_new_14", "--out", newpath("c.json") },
        { isatty = true, stdin = { "yes" } })
      assert.equal(0, r.code, r.err)
      assert.equal("cli_new_14", device(d.assetId).deviceKey)
    end)

    it("maps a wrong secret key to exit 3 and an unreachable gateway to exit 5", function()
      local d = seed { productKey = "pk_demo", deviceKey = "cli_old_15" }
      local r = run({ "device", "--asset-id", d.assetId, "--new-key", "cli_new_15", "--no-secret", "--yes" },
        { env = env { ENOS_SECRET_KEY = "wrong-secret-key" } })
      assert.equal(3, r.code, r.err)
      assert.matches("auth", r.err)
      r = run({ "device", "--asset-id", d.assetId, "--new-key", "cli_new_15", "--no-secret", "--yes", "--timeout", "2" },
        { env = env { ENOS_ENDPOINT = "https://127.0.0.1:" .. H.free_port() } })
      assert.equal(5, r.code, r.err)
      assert.equal("cli_old_15", device(d.assetId).deviceKey)
    end)

    it("usage errors exit 2", function()
      for _, argv in ipairs {
        { "device", "--asset-id", "A1", "--new-key", "x", "--yes" },                          -- key too short
        { "device", "--asset-id", "A1", "--product-key", "p", "--device-key", "d", "--new-key", "good_key", "--yes" },
        { "device", "--product-key", "p", "--new-key", "good_key", "--yes" },
        { "device", "--asset-id", "A1", "--yes" },
        { "device", "--asset-id", "A1", "--new-key", "good_key", "--format", "xml", "--yes" },
        { "device", "--asset-id", "A1", "--new-key", "good_key", "--wait-active", "soon", "--yes" },
        { "device", "--bogus" }, {}, { "nope" },
      } do
        local r = run(argv)
        assert.equal(2, r.code, table.concat(argv, " ") .. "\n" .. r.err)
      end
      -- a negative number is named as such (argparse alone would read it as an unknown option)
      local r = run { "device", "--asset-id", "A1", "--new-key", "good_key", "--timeout", "-1", "--yes" }
      assert.equal(2, r.code)
      assert.matches("--timeout -1: a negative number is not a valid value", r.err, 1, true)
      assert.equal(0, #h:log())
    end)

    it("--help of every command shows examples (exit 0)", function()
      for _, cmd in ipairs { "device", "get", "config" } do
        local r = run { cmd, "--help" }
        assert.equal(0, r.code)
        assert.matches("Usage: enos%-replace " .. cmd, r.out)
        assert.matches("Examples:", r.out)
      end
      local r = run { "--help" }
      assert.equal(0, r.code)
      assert.matches("Exit codes:", r.out)
    end)
  end)

  describe("get", function()
    it("shows a device; the secret only into a file or with --show-secret", function()
      local d = seed { productKey = "pk_demo", deviceKey = "cli_get_01" }
      local r = run { "get", "--asset-id", d.assetId }
      assert.equal(0, r.code, r.err)
      assert.matches("deviceKey +cli_get_01", r.out)
      r = run { "get", "--asset-id", d.assetId, "--secret" }
      assert.equal(2, r.code)
      local out = newpath("get.json")
      r = run { "get", "--product-key", "pk_demo", "--device-key", "cli_get_01", "--secret", "--out", out }
      assert.equal(0, r.code, r.err)
      assert.equal(device(d.assetId).deviceSecret, cjson.decode(H.readfile(out)).deviceSecret)
      assert.matches("(retrieved; hidden)", r.out, 1, true)
      r = run({ "get", "--asset-id", d.assetId, "--secret", "--show-secret", "--json" }, { scan = false })
      assert.equal(device(d.assetId).deviceSecret, json_of(r).device.deviceSecret)
      r = run { "get", "--asset-id", "NoSuchAsset1", "--json" }
      assert.equal(4, r.code)
      assert.equal("not_found", json_of(r).error.kind)
    end)
  end)

  describe("config", function()
    local function profile_env(text, mode, extra)
      local home = newpath("home")
      H.sh("mkdir -p " .. home .. "/.config/enos")
      H.writefile(home .. "/.config/enos/config", text, mode or "600")
      local e = { HOME = home }
      for k, v in pairs(extra or {}) do e[k] = v end
      return e, home .. "/.config/enos/config"
    end
    local PROFILE = table.concat({
      "# test profile", "[default]", "endpoint = https://default.example.com", "org_id = o_default",
      "access_key = default-access-key-1234", "secret_key = profile-secret-do-not-print",
      "", "[prod]", "endpoint = https://prod.example.com", "org_id = o_prod",
      "access_key = prod-access-key-5678", "secret_key = \"prod-secret-do-not-print\"",
      "private_key_file = keys/app.pem", "timeout = 12", "" }, "\n")

    it("shows values and their sources, masking the secret key", function()
      local e = profile_env(PROFILE)
      local r = run({ "config" }, { env = e })
      assert.equal(0, r.code, r.err)
      assert.matches("https://default.example.com", r.out, 1, true)
      assert.matches("profile [default]", r.out, 1, true)
      assert.matches("******** (hidden)", r.out, 1, true)
      assert.not_matches("profile-secret-do-not-print", r.out .. r.err, 1, true)
      assert.not_matches("default-access-key-1234", r.out, 1, true)
    end)

    it("applies flags > environment > profile (with --profile and ENOS_PROFILE)", function()
      local e, path = profile_env(PROFILE, "600", { ENOS_PROFILE = "prod", ENOS_ORG_ID = "o_env" })
      local r = run({ "config", "--json", "--endpoint", "https://flag.example.com" }, { env = e })
      assert.equal(0, r.code, r.err)
      local v = json_of(r)
      assert.equal("prod", v.profile)
      assert.equal("ENOS_PROFILE", v.profile_source)
      assert.equal("https://flag.example.com", v.settings.endpoint.value)
      assert.equal("flag --endpoint", v.settings.endpoint.source)
      assert.equal("o_env", v.settings.org_id.value)
      assert.equal("env ENOS_ORG_ID", v.settings.org_id.source)
      assert.equal("12", tostring(v.settings.timeout.value))
      assert.matches("^profile %[prod%]", v.settings.timeout.source)
      assert.equal(path:match("^(.*)/") .. "/keys/app.pem", v.settings.private_key_file.value)
      assert.equal("******** (hidden)", v.settings.secret_key.value)
      assert.not_matches("prod-secret-do-not-print", r.out, 1, true)
      r = run({ "config", "--json", "--profile", "default" }, { env = e })
      assert.equal("https://default.example.com", json_of(r).settings.endpoint.value)
    end)

    it("honours XDG_CONFIG_HOME and ENOS_CONFIG", function()
      local xdg = newpath("xdg")
      H.sh("mkdir -p " .. xdg .. "/enos")
      H.writefile(xdg .. "/enos/config", "[default]\nendpoint = https://xdg.example.com\n", "600")
      local r = run({ "config", "--json" }, { env = { HOME = "/nonexistent", XDG_CONFIG_HOME = xdg } })
      assert.equal("https://xdg.example.com", json_of(r).settings.endpoint.value)
      assert.equal(3, r.code)       -- incomplete
      local file = newpath("custom.ini")
      H.writefile(file, "[default]\nendpoint = https://custom.example.com\n", "600")
      r = run({ "config", "--json" }, { env = { XDG_CONFIG_HOME = xdg, ENOS_CONFIG = file } })
      assert.equal("https://custom.example.com", json_of(r).settings.endpoint.value)
      assert.equal("$ENOS_CONFIG", json_of(r).file_found_by)
    end)

    it("warns when a profile file holding a secret key is readable by others", function()
      local e, path = profile_env(PROFILE, "644")
      local r = run({ "config" }, { env = e })
      assert.matches("readable by group/others %(mode 644%)", r.err)
      assert.matches("chmod 600 " .. path, r.err, 1, true)
      e = profile_env("[default]\nendpoint = https://x.example.com\n", "644")
      r = run({ "config" }, { env = e })
      assert.not_matches("readable by group", r.err, 1, true)
    end)

    it("warns that --secret-key is visible in ps", function()
      local r = run({ "config", "--secret-key", "flag-secret-do-not-print" }, { env = BASE_ENV() })
      assert.equal(0, r.code, r.err)
      assert.matches("visible to other users", r.err)
      assert.not_matches("flag-secret-do-not-print", r.out .. r.err, 1, true)
    end)

    it("exits 3 for a missing profile, a bad profile file, or missing settings", function()
      local e = profile_env(PROFILE)
      local r = run({ "config", "--profile", "staging" }, { env = e })
      assert.equal(3, r.code)
      assert.matches("profile 'staging'", r.err, 1, true)
      assert.matches("default, prod", r.err, 1, true)
      e = profile_env("endpoint = x\n")
      r = run({ "config" }, { env = e })
      assert.equal(3, r.code)
      assert.matches("outside a %[profile%] section", r.err)
      -- repeated: a setting or a section (the last would win silently; repeated flags are refused too)
      e = profile_env("[default]\nendpoint = https://a.example.com\nsecret_key = one\nsecret_key = two\n")
      r = run({ "config" }, { env = e })
      assert.equal(3, r.code)
      assert.matches("'secret_key' is set twice in this section (first at line 3)", r.err, 1, true)
      assert.falsy(r.err:find("two", 1, true) and r.err:find("= two", 1, true))
      e = profile_env("[default]\nendpoint = https://a.example.com\n[prod]\norg_id = o1\n[default]\norg_id = o2\n")
      r = run({ "config" }, { env = e })
      assert.equal(3, r.code)
      assert.matches("section [default] appears twice (first at line 1)", r.err, 1, true)
      r = run({ "config" }, { env = { HOME = "/nonexistent" } })
      assert.equal(3, r.code)
      assert.matches("missing: endpoint, access_key, secret_key, org_id", r.err, 1, true)
      r = run({ "device", "--asset-id", "A1", "--new-key", "good_key", "--yes" }, { env = { HOME = "/nonexistent" } })
      assert.equal(3, r.code)
      assert.matches("missing configuration", r.err)
    end)

    it("uses the profile to talk to the simulator", function()
      local d = seed { productKey = "pk_demo", deviceKey = "cli_prof_01" }
      local text = string.format("[sim]\nendpoint = %s\naccess_key = %s\nsecret_key = %s\norg_id = %s\nca_file = %s\n",
        h.url, AK, SK, ORG, h.ca_file)
      local e = profile_env(text)
      local r = run({ "get", "--profile", "sim", "--asset-id", d.assetId }, { env = e })
      assert.equal(0, r.code, r.err)
      assert.matches("cli_prof_01", r.out)
    end)
  end)

  describe("bin/enos-replace (subprocess)", function()
    local interp = type(jit) == "table" and "luajit" or "lua5.4"
    local function sh(envs, args, stdin)
      local parts = { "cd " .. sim.root .. " && env -i PATH=\"$PATH\"" }
      for k, v in pairs(envs) do parts[#parts + 1] = k .. "=" .. "'" .. v .. "'" end
      local errf = os.tmpname()
      local cmd = table.concat(parts, " ") .. " " .. interp .. " bin/enos-replace " .. args .. " <" ..
        (stdin or "/dev/null") .. " 2>" .. errf .. "; echo \"__rc=$?\""
      local p = io.popen(cmd)
      local outs = p:read("*a")
      p:close()
      local errs = H.readfile(errf)
      os.remove(errf)
      local rc = tonumber(outs:match("__rc=(%d+)%s*$"))
      outs = outs:gsub("__rc=%d+%s*$", "")
      captured[#captured + 1] = outs .. "\n" .. errs
      return rc, outs, errs
    end

    it("prints help and version", function()
      local rc, o = sh({}, "--help")
      assert.equal(0, rc)
      assert.matches("Exit codes:", o)
      rc, o = sh({}, "--version")
      assert.equal(0, rc)
      assert.matches("^enos%-replace %d+%.%d+", o)
      rc, o = sh({}, "device -h")
      assert.equal(0, rc)
      assert.matches("Examples:", o)
    end)

    it("replaces a device with --yes from a non-terminal and writes a 0600 file", function()
      local d = seed { productKey = "pk_demo", deviceKey = "bin_old_01" }
      local out = newpath("bin.json")
      local e = BASE_ENV()
      local rc, o, err = sh(e, "device --asset-id " .. d.assetId .. " --new-key bin_new_01 --out " .. out .. " --yes")
      assert.equal(0, rc, err)
      assert.matches("Replaced: asset " .. d.assetId, o, 1, true)
      assert.equal("600", (H.sh("stat -c %a " .. out):gsub("%s", "")))
      assert.equal(device(d.assetId).deviceSecret, cjson.decode(H.readfile(out)).deviceSecret)
    end)

    it("refuses without a terminal and without --yes (exit 2)", function()
      local d = seed { productKey = "pk_demo", deviceKey = "bin_old_02" }
      local rc, _, err = sh(BASE_ENV(), "device --asset-id " .. d.assetId .. " --new-key bin_new_02 --out " .. newpath("b.json"))
      assert.equal(2, rc)
      assert.matches("stdin is not a terminal", err)
      assert.equal("bin_old_02", device(d.assetId).deviceKey)
    end)

    it("reports configuration (exit 0 / 3) and usage errors (exit 2)", function()
      local rc, o = sh(BASE_ENV(), "config")
      assert.equal(0, rc)
      assert.matches("env ENOS_SECRET_KEY", o, 1, true)
      assert.not_matches(SK, o, 1, true)
      rc = sh({ HOME = "/nonexistent" }, "config")
      assert.equal(3, rc)
      rc = sh({}, "device --frobnicate")
      assert.equal(2, rc)
    end)
  end)

  it("no secret reached stdout/stderr unless --show-secret", function()
    local secrets = { SK, "profile-secret-do-not-print", "prod-secret-do-not-print", "flag-secret-do-not-print",
      "wrong-secret-key", h:token() }
    for s in pairs(seen_secrets) do secrets[#secrets + 1] = s end
    assert.is_true(#secrets > 30)
    local pem_line = kp.private_pem:match("\n([^\n]+)\n")
    secrets[#secrets + 1] = pem_line
    assert.is_true(#captured > 40)
    for _, text in ipairs(captured) do
      for _, s in ipairs(secrets) do
        assert.is_nil(text:find(s, 1, true), "a secret leaked into output:\n" .. text)
      end
    end
  end)
end)
