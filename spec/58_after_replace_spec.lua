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
    for k = n + 1, #log do local op = log[k].op or "?" count[op] = (count[op] or 0) + 1 end
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

    it("device: a replace that drops the link is repaired, and the new triple logs in behind the same gateway",
      function()
      h:admin("POST", "/faults", { replace_detaches_subdevice = true })
      local old = h:device("S0000003")
      local out = dir .. "/s3.json"
      local before = #h:log()
      local code, stdout, err = run { "device", "--asset-id", "S0000003", "--new-key", "S-NEW-003", "--out", out,
        "--yes", "--json" }
      h:admin("DELETE", "/faults")
      assert.equal(0, code, err)
      local ops = ops_since(before)
      assert.equal(1, ops.addSubDevice)
      local report = cjson.decode(stdout)
      assert.equal("GW000001", report.gateway.assetId)
      assert.is_true(report.gateway.relinked)
      assert.matches("dropped the link to gateway GW000001", table.concat(report.warnings, " "))
      assert.equal("GW000001", h:device("S0000003").gateway)
      local rec = cjson.decode(H.readfile(out))
      assert.equal("GW000001", rec.gatewayAssetId)
      assert.equal("GW-1", rec.gatewayDeviceKey)
      -- behind the same gateway: the gateway online, the new triple logs in through it; the old one does not
      assert.equal(200, (h:login("pk_gateway", "GW-1", h:device("GW000001").deviceSecret)))
      local st, body = h:login_via("pk_gateway", "GW-1", "pk_demo", "S-OLD-003", old.deviceSecret)
      assert.equal(401, st, body and body.msg)
      st, body = h:login_via("pk_gateway", "GW-1", "pk_demo", "S-NEW-003", rec.deviceSecret)
      assert.equal(200, st, body and body.msg)
      assert.equal("GW000001", body.data.gateway)
      assert.equal("online", h:device("S0000003").status)
      -- not through another gateway, nor through one that is offline
      local gw2 = h:device("GW000002")
      st, body = h:login_via("pk_gateway", "GW-2", "pk_demo", "S-NEW-003", rec.deviceSecret)
      assert.equal(401, st)
      assert.matches("not online", body.msg)
      assert.equal(200, (h:login("pk_gateway", "GW-2", gw2.deviceSecret)))
      st, body = h:login_via("pk_gateway", "GW-2", "pk_demo", "S-NEW-003", rec.deviceSecret)
      assert.equal(401, st)
      assert.matches("not a sub%-device of gateway pk_gateway/GW%-2", body.msg)
    end)

    it("watch tells a gateway online with its sub-devices offline apart, and names it", function()
      -- (the rows of the test above: GW-1 logs in, its two replaced sub-devices do not; S-NEW-005 and S-NEW-010 do)
      local p = dir .. "/subs.csv"
      assert.equal(200, (h:login("pk_gateway", "GW-1", h:device("GW000001").deviceSecret)))
      for _, a in ipairs { "S0000005", "S0000010" } do
        local d = h:device(a)
        assert.equal(200, (h:login("pk_demo", d.deviceKey, d.deviceSecret)))
      end
      local before = #h:log()
      local code, out, err = run { "watch", p .. ".journal", "--wait", "0", "--json" }
      assert.equal(7, code, err)
      local last
      for line in out:gmatch("[^\n]+") do last = cjson.decode(line) end
      assert.is_true(last.final)
      assert.equal(2, last.online)
      assert.equal(1, #last.gateways_to_fix)
      assert.equal("GW000001", last.gateways_to_fix[1].gateway)
      assert.equal(2, last.gateways_to_fix[1].waiting)
      -- the gateways were read in the same search as the devices
      assert.equal(1, ops_since(before).search)
      local code2, _, err2 = run { "watch", p .. ".journal", "--wait", "0" }
      assert.equal(7, code2)
      assert.matches("gateway GW000001 is online but 2 of its replaced sub%-device%(s%) are not", err2)
      assert.matches("gateway%-GW000001%.csv", err2)
    end)
  end)

  describe("device: bad input for the steps after the replace, refused before any request", function()
    it("--csr that is missing, a private key, or without --out; --cert-days alone; bad --tag", function()
      H.sh(("openssl req -new -newkey rsa:2048 -nodes -keyout %s/u.key -out %s/u.csr -subj /CN=u 2>/dev/null")
        :format(dir, dir))
      local base = { "device", "--asset-id", "S0000035", "--new-key", "S-NEW-035", "--yes" }
      local function with(extra)
        local argv = {}
        for _, a in ipairs(base) do argv[#argv + 1] = a end
        for _, a in ipairs(extra) do argv[#argv + 1] = a end
        return argv
      end
      local before = #h:log()
      local cases = {
        { { "--csr", dir .. "/nope.csr", "--out", dir .. "/o1.json" }, "cannot read" },
        { { "--csr", dir .. "/u.key", "--out", dir .. "/o2.json" }, "private key" },
        { { "--csr", "/dev/zero", "--out", dir .. "/o2b.json" }, "is a char device, not a file" },
        { { "--csr", dir, "--out", dir .. "/o2c.json" }, "is a directory, not a file" },
        { { "--csr", dir .. "/u.csr" }, "--csr needs --out" },
        { { "--cert-days", "30", "--out", dir .. "/o3.json" }, "--cert-days goes with --csr" },
        { { "--csr", dir .. "/u.csr", "--cert-days", "0", "--out", dir .. "/o4.json" }, "--cert-days must be" },
        { { "--tag", "a=1", "--tag", "a=2", "--out", dir .. "/o5.json" }, "given twice" },
        { { "--tag", "x y=1", "--out", dir .. "/o6.json" }, "tag name" },
      }
      for _, case in ipairs(cases) do
        local code, _, err = run(with(case[1]))
        assert.equal(2, code, err)
        assert.matches(case[2], err, 1, true)
        assert.not_matches("BEGIN", err)
      end
      assert.equal(before, #h:log())
      assert.equal("S-OLD-035", h:device("S0000035").deviceKey)
    end)
  end)

  describe("certificate devices", function()
    local function keypair_csr(name, ec)
      local key, csr = dir .. "/" .. name .. ".key", dir .. "/" .. name .. ".csr"
      local newkey = ec and "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1" or "-newkey rsa:2048"
      H.sh(("openssl req -new %s -nodes -keyout %s -out %s -subj /CN=%s 2>/dev/null"):format(newkey, key, csr, name))
      return csr, key
    end
    local function write_pem(name, pem)
      local f = dir .. "/" .. name .. ".pem"
      H.writefile(f, pem)
      return f
    end
    local function apply(asset, csr)
      local st, body, raw = h:call("POST", "/connect-service/v2.0/certificates",
        { action = "apply", orgId = ORG, assetId = asset }, { csr = H.readfile(csr), issueAuthority = "ECC" },
        { app = { access_key = AK, secret_key = SK } })
      assert.equal(200, st)
      assert.equal(0, body.code, body.msg)
      -- (the serial as the platform wrote it: a bare number past 2^53, read as digits)
      body.data.certSN = raw:match('"certSN":(%d+)')
      return body.data
    end

    it("a certificate swap from the CLI: the old unit's certificate refused, the new one logging in", function()
      -- the old unit: a certificate issued for its key, which logs in over mutual TLS
      local old_csr, old_key = keypair_csr("old40", true)
      local issued = apply("S0000040", old_csr)
      local old_cert = write_pem("old40", issued.cert)
      local old = h:device("S0000040")
      local st, body = h:cert_login("pk_demo", old.deviceKey, old.deviceSecret, old_cert, old_key)
      assert.equal(200, st, body and body.msg)
      -- without --csr the replace is refused: nothing changes
      local before = #h:log()
      local code, _, err = run { "device", "--asset-id", "S0000040", "--new-key", "S-NEW-040", "--out",
        dir .. "/s40-refused.json", "--yes" }
      assert.equal(4, code, err)
      assert.matches("valid certificate", err)
      assert.is_nil(ops_since(before).replaceDevice)
      -- with the new unit's CSR: replaced, the old certificate revoked, the new one in the record
      local new_csr, new_key = keypair_csr("new40", false)
      local out = dir .. "/s40.json"
      before = #h:log()
      code, _, err = run { "device", "--asset-id", "S0000040", "--new-key", "S-NEW-040", "--csr", new_csr,
        "--out", out, "--yes" }
      assert.equal(0, code, err)
      local ops = ops_since(before)
      assert.equal(1, ops.replaceDevice)
      assert.equal(1, ops["cert.revoke"])
      assert.equal(1, ops["cert.apply"])
      local rec = cjson.decode(H.readfile(out))
      assert.equal("600", H.sh("stat -c %a " .. out):match("%d+"))
      assert.matches("BEGIN CERTIFICATE", rec.certificate)
      assert.matches("^%d+$", rec.certSn)
      local by_sn = {}
      for _, c in ipairs(select(2, h:admin("GET", "/certificates?assetId=S0000040")).data) do by_sn[c.sn] = c end
      assert.is_true(#issued.certSN > 16)              -- past 2^53: kept exact from the list to the revoke
      assert.equal(1, by_sn[issued.certSN].certStatus)
      assert.equal(4, by_sn[issued.certSN].revokerReason)
      assert.equal(0, by_sn[rec.certSn].certStatus)
      -- the old unit, even with the new triple, is refused: its certificate is revoked
      local new_cert = write_pem("new40", rec.certificate)
      st, body = h:cert_login("pk_demo", "S-NEW-040", rec.deviceSecret, old_cert, old_key)
      assert.equal(401, st)
      assert.matches("certificate revoked", body.msg)
      -- the new unit logs in with its certificate and its new triple
      st, body = h:cert_login("pk_demo", "S-NEW-040", rec.deviceSecret, new_cert, new_key)
      assert.equal(200, st, body and body.msg)
      assert.equal("online", h:device("S0000040").status)
      -- without a client certificate, or with another device's, refused
      st, body = h:cert_login("pk_demo", "S-NEW-040", rec.deviceSecret)
      assert.equal(401, st)
      assert.matches("client certificate required", body.msg)
      local other = h:device("S0000039")
      st, body = h:cert_login("pk_demo", other.deviceKey, other.deviceSecret, new_cert, new_key)
      assert.equal(401, st)
      assert.matches("bound to another device", body.msg)
      -- run again with --finish: nothing revoked, nothing issued, no second replace
      before = #h:log()
      code, _, err = run { "device", "--asset-id", "S0000040", "--new-key", "S-NEW-040", "--csr", new_csr,
        "--out", out, "--overwrite", "--finish", "--yes" }
      assert.equal(0, code, err)
      ops = ops_since(before)
      assert.is_nil(ops.replaceDevice)
      assert.is_nil(ops["cert.revoke"])
      assert.is_nil(ops["cert.apply"])
      assert.equal(rec.certSn, cjson.decode(H.readfile(out)).certSn)
    end)
  end)

  describe("certificate devices in a batch", function()
    it("a csr plan column: checked before anything is sent; each row's certificate issued beside the credentials",
      function()
      local function csr(name)
        H.sh(("openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout %s/%s.key " ..
          "-out %s/%s.csr -subj /CN=%s 2>/dev/null"):format(dir, name, dir, name, name))
        return name .. ".csr"                     -- (relative to the plan's directory)
      end
      -- the old unit of row 1 has a valid certificate
      H.sh(("openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout %s/o21.key " ..
        "-out %s/o21.csr -subj /CN=o21 2>/dev/null"):format(dir, dir))
      local st, body = h:call("POST", "/connect-service/v2.0/certificates", { action = "apply", orgId = ORG,
        assetId = "S0000021" }, { csr = H.readfile(dir .. "/o21.csr"), issueAuthority = "ECC" },
        { app = { access_key = AK, secret_key = SK } })
      assert.equal(200, st)
      assert.equal(0, body.code)
      local p = dir .. "/certs.csv"
      H.writefile(p, "productKey,deviceKey,newDeviceKey,csr\n" ..
        "pk_demo,S-OLD-021,C-NEW-021," .. csr("n21") .. "\n" ..
        "pk_demo,S-OLD-022,C-NEW-022," .. csr("n22") .. "\n" ..
        "pk_demo,S-OLD-023,C-NEW-023,\n")
      -- a row naming a missing CSR: the whole batch refused before any request
      local bad = dir .. "/certs-bad.csv"
      H.writefile(bad, "productKey,deviceKey,newDeviceKey,csr\npk_demo,S-OLD-021,C-NEW-021,missing.csr\n")
      H.writefile(dir .. "/key-not-csr.csv", "productKey,deviceKey,newDeviceKey,csr\n" ..
        "pk_demo,S-OLD-021,C-NEW-021,n21.key\npk_demo,S-OLD-022,C-NEW-022,.\n")
      local before = #h:log()
      local code, _, err = run { "batch", bad, "--out", dir .. "/bad-creds.csv", "--yes" }
      assert.equal(2, code, err)
      assert.matches("certs%-bad%.csv:2: cannot read CSR", err)
      -- --check reads the CSRs too: every bad one by line (a private key, a directory)
      code, _, err = run { "batch", dir .. "/key-not-csr.csv", "--check" }
      assert.equal(2, code, err)
      assert.matches("key%-not%-csr%.csv:2: CSR [^\n]*private key", err)
      assert.matches("key%-not%-csr%.csv:3: CSR [^\n]*is a directory", err)
      assert.not_matches("BEGIN", err)
      assert.equal(before, #h:log())
      local creds = dir .. "/certs-creds.csv"
      code, _, err = run { "batch", p, "--out", creds, "--yes" }
      assert.equal(0, code, err)
      local ops = ops_since(before)
      assert.equal(3, ops.replaceDevice)
      assert.equal(2, ops["cert.apply"])
      assert.equal(1, ops["cert.revoke"])             -- row 1's old certificate
      local rows = csv_rows(creds)
      local by = {}
      for _, r in ipairs(rows) do by[r.deviceKey] = r end
      for _, k in ipairs { "C-NEW-021", "C-NEW-022" } do
        local r = by[k]
        assert.matches("^%d+$", r.certSn)
        assert.equal(dir .. "/certs-creds.cert-" .. k .. ".pem", r.certificateFile)
        local pem = H.readfile(r.certificateFile)
        assert.matches("BEGIN CERTIFICATE", pem)
        assert.equal("600", H.sh("stat -c %a " .. r.certificateFile):match("%d+"))
      end
      assert.equal("", by["C-NEW-023"].certSn or "")
      -- the new unit of row 1 logs in with its certificate; the old unit's certificate is refused
      local d = h:device("S0000021")
      local cert_file = dir .. "/n21.crt"
      H.writefile(cert_file, H.readfile(by["C-NEW-021"].certificateFile))
      st = h:cert_login("pk_demo", "C-NEW-021", d.deviceSecret, cert_file, dir .. "/n21.key")
      assert.equal(200, st)
      H.writefile(dir .. "/o21.crt", body.data.cert)
      local _, b2 = h:cert_login("pk_demo", "C-NEW-021", d.deviceSecret, dir .. "/o21.crt", dir .. "/o21.key")
      assert.matches("certificate revoked", b2.msg)
    end)
  end)

  describe("from Lua", function()
    it("workflow.replace with a CSR, tags and the gateway check; enos.fleet.audit; enos.fleet.watch's gateways",
      function()
      local enos = require "enos"
      local workflow = require "enos.workflow"
      H.sh(("openssl req -new -newkey rsa:2048 -nodes -keyout %s/l4.key -out %s/l4.csr -subj /CN=l4 2>/dev/null")
        :format(dir, dir))
      local c = assert(enos.client { endpoint = h.url, access_key = AK, secret_key = SK, org_id = ORG,
        private_key_file = kp.private_file })
      local r = assert(workflow.replace(c, { assetId = "S0000004", newDeviceKey = "L-NEW-004" },
        { csr = H.readfile(dir .. "/l4.csr"), tags = { crew = "7" }, stamp = true, sleep = function() end }))
      assert.is_true(r.ok, tostring(r.error))
      assert.equal("GW000001", r.gateway.assetId)
      assert.matches("^%d+$", r.certificates.issued)
      local rec = r:record()
      assert.equal(h:device("S0000004").deviceSecret, rec.deviceSecret)
      assert.matches("BEGIN CERTIFICATE", rec.certificate)
      assert.equal("GW000001", rec.gatewayAssetId)
      assert.equal("7", h:device("S0000004").deviceTags.crew)
      assert.not_matches(rec.deviceSecret, tostring(r), 1, true)
      -- the audit sees it (stamped, never online since); the watch names its gateway once the gateway is online
      local a = assert(enos.fleet.audit(c, { { assetId = "S0000004", since = 0, source = "lua" } }))
      assert.equal(1, #a.pending)
      assert.equal("S0000004", a.pending[1].assetId)
      assert.equal(200, (h:login("pk_gateway", "GW-1", h:device("GW000001").deviceSecret)))
      local w = assert(enos.fleet.watch(c, { { assetId = "S0000004", gateway = "GW000001" } },
        { timeout = 0, sleep = function() end }))
      assert.equal("timeout", w.outcome)
      assert.equal("GW000001", w.gateways_to_fix[1].gateway)
      assert.equal("online", w.devices[1].gateway_status)
      -- the new triple logs in through the gateway: online, audit empty
      assert.equal(200, (h:login_via("pk_gateway", "GW-1", "pk_demo", "L-NEW-004", rec.deviceSecret)))
      w = assert(enos.fleet.watch(c, { { assetId = "S0000004", gateway = "GW000001" } },
        { timeout = 0, sleep = function() end }))
      assert.equal("online", w.outcome)
      a = assert(enos.fleet.audit(c, { { assetId = "S0000004", since = 0 } }))
      assert.equal(0, #a.pending)
    end)
  end)

  describe("a crash during the steps after the replace", function()
    it("kill -9 while rows are being tagged, then --resume: each device replaced once, tagged, every secret kept",
      function()
      local INTERP = type(jit) == "table" and "luajit" or "lua5.4"
      local function q(v) return "'" .. tostring(v):gsub("'", "'\\''") .. "'" end
      local rows = {}
      for i = 24, 29 do rows[#rows + 1] = { "pk_demo", ("S-OLD-%03d"):format(i), ("K-NEW-%03d"):format(i), "x" } end
      local p = plan("kill.csv", rows)
      local creds = dir .. "/kill-creds.csv"
      -- the platform holds every Update Device for 3 s: the process dies among the tag steps
      h:admin("POST", "/faults", { match = "update", latency_ms = 3000 })
      local before = #h:log()
      local penv = ("ENOS_ENDPOINT=%s ENOS_ACCESS_KEY=%s ENOS_SECRET_KEY=%s ENOS_ORG_ID=%s ENOS_PRIVATE_KEY_FILE=%s " ..
        "ENOS_CONFIG=/nonexistent"):format(q(h.url), AK, SK, ORG, q(kp.private_file))
      os.execute(("env %s %s bin/enos-replace batch %s --out %s --stamp --concurrency 3 --yes </dev/null " ..
        ">/dev/null 2>&1 & pid=$!; sleep 2.5; kill -9 $pid; wait $pid 2>/dev/null"):format(penv, INTERP, q(p), q(creds)))
      h:admin("DELETE", "/faults")
      local j = H.readfile(p .. ".journal")
      local _, replaced = j:gsub('"state":"replaced"', "")
      assert.is_true(replaced >= 1, "no row reached its steps after the replace before the kill")
      assert.is_nil(j:find('"state":"done"', 1, true))
      local code, _, err = run { "batch", p, "--out", creds, "--stamp", "--resume", "--yes" }
      assert.equal(0, code, err)
      local ops = ops_since(before)
      assert.equal(6, ops.replaceDevice)            -- each device once, the killed run's and the resume's together
      local got = {}
      for _, r in ipairs(csv_rows(creds)) do
        assert.is_nil(got[r.deviceKey], "twice in the credentials: " .. r.deviceKey)
        got[r.deviceKey] = true
        assert.equal(h:device(r.assetId).deviceSecret, r.deviceSecret)
      end
      for i = 24, 29 do
        local d = h:device(("S%07d"):format(i))
        assert.equal(("K-NEW-%03d"):format(i), d.deviceKey)
        assert.equal(("S-OLD-%03d"):format(i), d.deviceTags.replacedFrom)
        assert.is_true(got[d.deviceKey])
      end
    end)
  end)

  describe("the watch when polls fail", function()
    it("a failed poll leaves the status unknown and the watch goes on; a refused key stops it (exit 3)", function()
      local enos = require "enos"
      local fleet = require "enos.fleet"
      for _, a in ipairs { "S0000030", "S0000031" } do
        local d = h:device(a)
        assert.equal(200, (h:login("pk_demo", d.deviceKey, d.deviceSecret)))
      end
      local c = assert(enos.client { endpoint = h.url, access_key = AK, secret_key = SK, org_id = ORG })
      assert(c:authenticate())
      -- every attempt of the first poll's search fails (the bulk read tries 4 times)
      h:admin("POST", "/faults", { match = "search", error_share = 1, error_status = 503, count = 4 })
      local polls = {}
      local t = 0
      local r = assert(fleet.watch(c, { { assetId = "S0000030" }, { assetId = "S0000031" } }, { interval = 1,
        timeout = 60, sleep = function(s) t = t + s * 1000 end, clock = function() return t end,
        on_poll = function(s) polls[#polls + 1] = s end }))
      h:admin("DELETE", "/faults")
      assert.equal("online", r.outcome)
      assert.equal(2, #polls)
      assert.equal(2, polls[1].counts.unknown)
      assert.equal(0, polls[1].online)
      assert.equal(2, polls[2].online)
      -- a refused key: one error, exit 3, no poll loop
      local code, _, err = cli.main { argv = { "watch", dir .. "/subs.csv.journal", "--wait", "60" },
        env = env { ENOS_SECRET_KEY = "not-the-secret-key" }, stdout = function() end,
        stderr = function(s) polls.err = (polls.err or "") .. s end, isatty = false, sleep = function() end }
      assert.equal(3, code, err)
      assert.not_matches("not%-the%-secret%-key", polls.err)
    end)
  end)

  describe("the trail", function()
    it("batch --stamp --tag tags each asset; audit after a partial rollout lists the units never online since",
      function()
      local rows = {}
      for i = 11, 16 do rows[#rows + 1] = { "pk_demo", ("S-OLD-%03d"):format(i), ("T-NEW-%03d"):format(i), "east" } end
      local p = plan("trail.csv", rows)
      local creds = dir .. "/trail-creds.csv"
      local before = #h:log()
      local code, _, err = run { "batch", p, "--out", creds, "--stamp", "--tag", "ticket=CHG-42", "--yes" }
      assert.equal(0, code, err)
      local ops = ops_since(before)
      assert.equal(6, ops.replaceDevice)
      assert.equal(6, ops.update)                   -- one Update Device a row, on top of the replace
      local d = h:device("S0000011")
      assert.equal("CHG-42", d.deviceTags.ticket)
      assert.equal("S-OLD-011", d.deviceTags.replacedFrom)
      assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%dZ$", d.deviceTags.replacedAt)
      -- half the new units are installed: they log in
      for i = 11, 13 do
        local x = h:device(("S%07d"):format(i))
        assert.equal(200, (h:login("pk_demo", x.deviceKey, x.deviceSecret)))
      end
      local out
      code, out, err = run { "audit", p .. ".journal" }
      assert.equal(7, code, err)
      for i = 14, 16 do assert.matches(("S%07d"):format(i), out, 1, true) end
      for i = 11, 13 do assert.not_matches(("S%07d"):format(i), out, 1, true) end
      assert.matches("3 device%(s%) replaced and not online since", err)
      -- from the platform alone: the stamped, inactive devices (the same three)
      code, out = run { "audit", "--platform", "--json" }
      assert.equal(7, code)
      local seen = {}
      for line in out:gmatch("[^\n]+") do
        local r = cjson.decode(line)
        seen[r.assetId] = r
      end
      for i = 14, 16 do
        local r = seen[("S%07d"):format(i)]
        assert.is_table(r)
        assert.equal("platform", r.source)
        assert.is_number(r.age)
      end
      assert.is_nil(seen.S0000011)
      -- old enough only: none of these is a day old
      code, out = run { "audit", p .. ".journal", "--min-age", "86400" }
      assert.equal(0, code)
      assert.equal("", out)
      -- usage errors, before any request
      before = #h:log()
      assert.equal(2, (run { "audit" }))
      assert.equal(2, (run { "audit", p }))           -- a plan is not a journal
      assert.equal(2, (run { "audit", p .. ".journal", "--min-age", "-1" }))
      assert.equal(2, (run { "batch", p, "--tag", "bad name=x", "--out", dir .. "/x.csv", "--yes" }))
      assert.equal(2, (run { "batch", p, "--tag", "novalue", "--out", dir .. "/x.csv", "--yes" }))
      assert.equal(before, #h:log())
    end)

    it("a tag step that fails leaves the rows replaced (secrets delivered), and --resume finishes them once",
      function()
      local rows = {}
      for i = 17, 20 do rows[#rows + 1] = { "pk_demo", ("S-OLD-%03d"):format(i), ("U-NEW-%03d"):format(i), "west" } end
      local p = plan("tagfail.csv", rows)
      local creds = dir .. "/tagfail-creds.csv"
      h:admin("POST", "/faults", { match = "update", error_share = 1, error_status = 500, count = 100 })
      local before = #h:log()
      local code, _, err = run { "batch", p, "--out", creds, "--stamp", "--yes" }
      h:admin("DELETE", "/faults")
      assert.equal(4, code, err)
      assert.equal(4, ops_since(before).replaceDevice)
      local results = csv_rows(p .. ".results.csv")
      for _, r in ipairs(results) do
        assert.equal("failed", r.outcome)
        assert.matches("replaced, but the tag step failed", r.message, 1, true)
      end
      -- the secrets are in hand already
      local creds_rows = csv_rows(creds)
      assert.equal(4, #creds_rows)
      for _, r in ipairs(creds_rows) do assert.equal(h:device(r.assetId).deviceSecret, r.deviceSecret) end
      assert.matches('"state":"replaced"', H.readfile(p .. ".journal"))
      before = #h:log()
      code, _, err = run { "batch", p, "--out", creds, "--stamp", "--resume", "--yes" }
      assert.equal(0, code, err)
      local ops = ops_since(before)
      assert.is_nil(ops.replaceDevice)               -- never a second replace
      assert.equal(4, ops.update)
      for i = 17, 20 do
        local d = h:device(("S%07d"):format(i))
        assert.equal(("S-OLD-%03d"):format(i), d.deviceTags.replacedFrom)
        assert.equal(("U-NEW-%03d"):format(i), d.deviceKey)
      end
      assert.equal(4, #csv_rows(creds))             -- each device once in the credentials file
      code = run { "batch", p, "--out", creds, "--stamp", "--resume", "--yes" }
      assert.equal(0, code)
    end)
  end)
end)
