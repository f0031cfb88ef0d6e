-- enos.workflow step by step against a stub transport playing a small, stateful EnOS.
local enos = require "enos"
local workflow = require "enos.workflow"
local core = require "enos.core"
local cjson = require "cjson"
local H = require "helpers"

local ORG = "o15724268424841"

-- A fake EnOS: devices by assetId, topology, and per-action fault hooks
-- (functions(req, F) returning a reply / nil+err, or nothing to carry on).
local function fake(opts)
  opts = opts or {}
  local F = { devices = {}, subs = {}, calls = {}, faults = {}, pub = opts.pub, n = 0 }
  function F.add(d)
    F.n = F.n + 1
    local dev = { orgId = ORG, assetId = d.assetId or ("asset" .. F.n), productKey = d.productKey or "pk_demo",
      deviceKey = d.deviceKey, status = d.status or "online", productType = d.productType or "Device",
      deviceSecret = d.deviceSecret or ("secret-" .. F.n .. "-abcdefgh"), activeTime = 1600000000000,
      deviceName = { defaultValue = "dev " .. F.n } }
    F.devices[dev.assetId] = dev
    if d.gateway then
      F.subs[d.gateway] = F.subs[d.gateway] or {}
      table.insert(F.subs[d.gateway], dev.assetId)
    end
    return dev
  end
  local function find(q)
    if q.assetId then return F.devices[q.assetId] end
    for _, d in pairs(F.devices) do
      if d.productKey == q.productKey and d.deviceKey == q.deviceKey then return d end
    end
  end
  local function secret_fields(dev, v21, require_secret)
    if v21 then return dev.deviceSecret end
    if require_secret then
      if F.garbage_secret then return "AAAA", "BBBB" end
      local sk, ds = H.encrypt_secret(F.pub, dev.deviceSecret)
      return ds, sk
    end
  end
  local function view(dev, v21, rs)
    local v = {}
    for k, x in pairs(dev) do v[k] = x end
    v.deviceSecret, v.sessionKey = secret_fields(dev, v21, rs)
    return v
  end
  local NOT_FOUND = H.envelope(nil, 99400, "Invalid arguments: device does not exist")
  local actions = {}
  function actions.get(q, _, v21)
    local d = find(q)
    if not d then return NOT_FOUND end
    return H.envelope(view(d, v21, q.requireSecret == "true"))
  end
  function actions.search(_, body)
    local pk, dk = body.expression:match("productKey = '([^']*)' and deviceKey = '([^']*)'")
    local out = {}
    for _, d in pairs(F.devices) do
      if d.productKey == pk and d.deviceKey == dk then out[#out + 1] = view(d) end
    end
    return H.envelope(out, 0, "OK", { pagination = { pageNo = 1, pageSize = 10, totalSize = #out } })
  end
  function actions.replaceDevice(q, body, v21)
    local d = find(q)
    if not d then return NOT_FOUND end
    if F.drop_link then           -- a platform whose replace drops a sub-device's gateway link
      for _, subs in pairs(F.subs) do
        for i = #subs, 1, -1 do if subs[i] == d.assetId then table.remove(subs, i) end end
      end
    end
    if d.deviceKey == body.newDeviceKey then return H.envelope(nil, 11704, "DeviceKey is repetitive") end
    if find { productKey = d.productKey, deviceKey = body.newDeviceKey } then
      return H.envelope(nil, 11702, "DeviceKey existed")
    end
    F.secret_seq = (F.secret_seq or 0) + 1
    d.deviceKey, d.status, d.activeTime = body.newDeviceKey, "inactive", 0
    d.deviceSecret = "NewSecret" .. F.secret_seq .. "xyzXYZ"
    local ds, sk = secret_fields(d, v21, body.requireSecret)
    return H.envelope { assetId = d.assetId, productKey = d.productKey, deviceKey = d.deviceKey,
      deviceSecret = ds, sessionKey = sk }
  end
  function actions.searchSubDevice(_, body)
    local gw = find(body.gateway)
    if not gw then return NOT_FOUND end
    local out = {}
    for _, a in ipairs(F.subs[gw.assetId] or {}) do out[#out + 1] = view(F.devices[a]) end
    return H.envelope(out, 0, "OK", { pagination = { pageNo = 1, pageSize = 200, totalSize = #out } })
  end
  function actions.getGateway(q)
    local d = find(q)
    if not d then return NOT_FOUND end
    for gw, subs in pairs(F.subs) do
      for _, a in ipairs(subs) do if a == d.assetId then return H.envelope(view(F.devices[gw])) end end
    end
    return H.envelope(nil)
  end
  -- Certificates: F.certs[assetId] = list of {certSN (digits), cert (PEM), certStatus}; serials are written as
  -- bare JSON numbers (they may pass 2^53, as X.509 serials do)
  local function raw_serials(reply)
    reply.body = reply.body:gsub('"certSN":"(%d+)"', '"certSN":%1')
    return reply
  end
  function actions.list(q)
    if not find(q) then return H.envelope(nil, 11404, "device not found") end
    local list = F.certs and F.certs[find(q).assetId] or {}
    return raw_serials(H.envelope(#list > 0 and list or cjson.empty_array or {}))
  end
  function actions.revoke(q, body)
    local d = find(q)
    if not d then return H.envelope(nil, 11404, "device not found") end
    F.revoked = F.revoked or {}
    for _, c in ipairs(F.certs and F.certs[d.assetId] or {}) do
      if c.certSN == F.raw_sn and c.certStatus == 0 then
        c.certStatus, c.revokerReason = 1, body.reason
        F.revoked[#F.revoked + 1] = c.certSN
        return H.envelope(nil)
      end
    end
    return H.envelope(nil, 99400, "Invalid arguments: certificate is not a valid certificate of this device")
  end
  function actions.apply(q, body)
    local d = find(q)
    if not d then return H.envelope(nil, 11404, "device not found") end
    F.cert_seq = (F.cert_seq or 0) + 1
    local sn = "98765432109876543" .. F.cert_seq         -- (past 2^53: exact only as digits)
    local cert = F.sign_csr(body.csr, sn)
    F.certs = F.certs or {}
    F.certs[d.assetId] = F.certs[d.assetId] or {}
    table.insert(F.certs[d.assetId], { certSN = sn, cert = cert, certStatus = 0 })
    return raw_serials(H.envelope { certSN = sn, cert = cert, caCert = F.ca_pem, issueAuthority = body.issueAuthority })
  end
  function actions.update(q, body)
    local d = find(q)
    if not d then return NOT_FOUND end
    if type(body.timezone) ~= "string" or type(body.deviceName) ~= "table" then
      return H.envelope(nil, 99400, "Invalid arguments: timezone and deviceName are required")
    end
    F.updates = F.updates or {}
    F.updates[#F.updates + 1] = body
    if body.deviceTags then d.deviceTags = body.deviceTags end
    return H.envelope(nil)
  end
  function actions.addSubDevice(_, body)
    local gw = find(body.gateway)
    F.subs[gw.assetId] = F.subs[gw.assetId] or {}
    for _, ident in ipairs(body.subDevices) do table.insert(F.subs[gw.assetId], find(ident).assetId) end
    return H.envelope(nil)
  end
  F.stub = H.stub(function(req, stub)
    local qs = req.url:match("%?(.*)$") or ""
    local q = core.parse_query(qs)
    -- (a revoke's serial is kept as the digits sent: cjson would read a number past 2^53 inexactly)
    F.raw_sn = req.body and req.body:match('"certSn":(%d+)')
    local body = req.body and cjson.decode(req.body) or {}
    local v21 = req.url:find("/v2.1/devices", 1, true) ~= nil
    F.calls[#F.calls + 1] = q.action
    local hooks = F.faults[q.action]
    if hooks and #hooks > 0 then
      local hook = table.remove(hooks, 1)
      local r, e = hook(req, F, stub)
      if r ~= nil or e ~= nil then return r, e end
    end
    return actions[q.action](q, body, v21)
  end)
  function F.count(action)
    local n = 0
    for _, a in ipairs(F.calls) do if a == action then n = n + 1 end end
    return n
  end
  function F.apply(req)  -- run an action for real (a hook that applies, then fails)
    local q = core.parse_query(req.url:match("%?(.*)$"))
    return actions[q.action](q, req.body and cjson.decode(req.body) or {}, req.url:find("/v2.1/", 1, true) ~= nil)
  end
  return F
end

local function client_for(F, extra)
  local o = { endpoint = "https://gw.example.com", access_key = "ak-123456", secret_key = "super-secret-key-xyz",
    org_id = ORG, transport = F.stub }
  for k, v in pairs(extra or {}) do o[k] = v end
  return assert(enos.client(o))
end

-- A fake clock and sleep so backoff and polling take no time.
local function fast(extra)
  local t = { now = 1000, slept = {} }
  local o = { clock = function() return t.now end,
    sleep = function(s) t.slept[#t.slept + 1] = s; t.now = t.now + s * 1000 end }
  for k, v in pairs(extra or {}) do o[k] = v end
  return o, t
end

local function step_names(report)
  local out = {}
  for _, s in ipairs(report.steps) do out[#out + 1] = s.name .. ":" .. s.outcome end
  return table.concat(out, " ")
end

local TRANSPORT_DROP = { kind = "transport", message = "Empty reply from server (curl 52)", request_sent = true, curl_code = 52 }

describe("enos.workflow.replace", function()
  local kp
  setup(function() kp = H.keypair() end)

  it("replaces by assetId (V2.1 clear secret): every step, the secret, a safe tostring", function()
    local F = fake()
    local d = F.add { deviceKey = "old_key_01" }
    local c = client_for(F, { api_version = "v2.1" })
    local seen = {}
    local r = assert(workflow.replace(c, { assetId = d.assetId, newDeviceKey = "new_key_01" },
      fast { on_step = function(s) seen[#seen + 1] = s.name end }))
    assert.is_true(r.ok)
    assert.equal("replaced", r.outcome)
    assert.equal("preflight:ok replace:ok deliver:ok verify:ok", step_names(r))
    assert.same({ "preflight", "replace", "deliver", "verify" }, seen)
    assert.equal("old_key_01", r.old.deviceKey)
    assert.equal("online", r.old.status)
    assert.equal("new_key_01", r.new.deviceKey)
    assert.equal(d.assetId, r.new.assetId)
    assert.equal(F.devices[d.assetId].deviceSecret, r.new.deviceSecret)
    assert.equal("inactive", r.new.status)
    assert.equal(1, r.attempts)
    for _, s in ipairs(r.steps) do assert.is_number(s.ms) end
    local text = tostring(r)
    assert.matches("replaced", text)
    assert.not_matches(r.new.deviceSecret, text, 1, true)
    assert.equal(r.new.deviceSecret, r:record().deviceSecret)
    assert.equal(1, F.count("replaceDevice"))
  end)

  it("replaces by productKey+deviceKey with requireSecret and decrypts the new secret", function()
    local F = fake { pub = kp.public_file }
    F.add { deviceKey = "old_key_02" }
    local c = client_for(F, { private_key_file = kp.private_file })
    local r = assert(workflow.replace(c, { productKey = "pk_demo", deviceKey = "old_key_02", newDeviceKey = "new_key_02" }, fast()))
    assert.is_true(r.require_secret)
    assert.equal("replaced", r.outcome)
    local dev = F.devices[r.new.assetId]
    assert.equal(dev.deviceSecret, r.new.deviceSecret)
    assert.is_string(r.new.encrypted.sessionKey)
    local rep
    for _, q in ipairs(F.stub:api_requests()) do if q.url:find("replaceDevice") then rep = q end end
    assert.matches("deviceKey=old_key_02", rep.url)
    assert.equal('{"newDeviceKey":"new_key_02","requireSecret":true}', rep.body)
  end)

  it("steps = false: the same replace and credentials, a lean report (no steps, no record)", function()
    local F = fake { pub = kp.public_file }
    F.add { deviceKey = "old_key_lean" }
    local c = client_for(F, { private_key_file = kp.private_file })
    local o = fast()
    o.steps = false
    local r = assert(workflow.replace(c, { productKey = "pk_demo", deviceKey = "old_key_lean", newDeviceKey = "new_key_lean" }, o))
    assert.equal("replaced", r.outcome)
    assert.is_true(r.ok)
    assert.equal(F.devices[r.new.assetId].deviceSecret, r.new.deviceSecret)
    assert.equal("new_key_lean", F.devices[r.new.assetId].deviceKey)
    assert.same({}, r.steps)
    assert.is_nil(r:record())
    local _, err = workflow.replace(c, { assetId = r.new.assetId, newDeviceKey = "x_key_lean" }, { steps = "no" })
    assert.matches("steps must be a boolean", err.message)
  end)

  it("without a private key does not ask for the secret, and says so", function()
    local F = fake()
    local d = F.add { deviceKey = "old_key_03" }
    local r = assert(workflow.replace(client_for(F), { assetId = d.assetId, newDeviceKey = "new_key_03" }, fast()))
    assert.is_false(r.require_secret)
    assert.is_nil(r.new.deviceSecret)
    assert.matches("not requested", table.concat(r.warnings, " "))
  end)

  describe("preflight refusals change nothing", function()
    local cases = {
      { "a missing device", function() return { assetId = "nope1234", newDeviceKey = "new_key_x" } end, "not_found" },
      { "a disabled device", function(F) return { assetId = F.add { deviceKey = "k_dis", status = "disable" }.assetId,
        newDeviceKey = "new_key_x" } end, "conflict", "disabled" },
      { "a mirror device", function(F) return { assetId = F.add { deviceKey = "k_mir", status = "mirror" }.assetId,
        newDeviceKey = "new_key_x" } end, "conflict", "mirror" },
      { "the same key", function(F) return { assetId = F.add { deviceKey = "same_key" }.assetId,
        newDeviceKey = "same_key" } end, "invalid_argument", "equals" },
      { "a key already taken", function(F)
        F.add { deviceKey = "taken_key" }
        return { assetId = F.add { deviceKey = "k_other" }.assetId, newDeviceKey = "taken_key" } end,
        "conflict", "already used" },
    }
    for _, case in ipairs(cases) do
      it("refuses " .. case[1], function()
        local F = fake()
        local target = case[2](F)
        local r, err = workflow.replace(client_for(F), target, fast())
        assert.is_nil(r)
        assert.equal(case[3], err.kind)
        if case[4] then assert.matches(case[4], err.message, 1, true) end
        assert.is_true(err.refused)
        assert.equal("preflight", err.step)
        assert.equal("refused", err.report.outcome)
        assert.is_false(err.report.ok)
        assert.equal(0, F.count("replaceDevice"))
      end)
    end

    it("skips the free-key search with check_free = false (and the platform answers 11702)", function()
      local F = fake()
      F.add { deviceKey = "taken_key" }
      local d = F.add { deviceKey = "k_other" }
      local r, err = workflow.replace(client_for(F), { assetId = d.assetId, newDeviceKey = "taken_key" },
        fast { check_free = false })
      assert.is_nil(r)
      assert.equal(0, F.count("search"))
      assert.equal("conflict", err.kind)
      assert.equal(11702, err.code)
      assert.equal("refused", err.report.outcome)
      assert.equal("k_other", F.devices[d.assetId].deviceKey)
    end)

    it("refuses an existing output file before changing anything", function()
      local F = fake()
      local d = F.add { deviceKey = "old_key_04" }
      local dir = H.tmpdir()
      H.writefile(dir .. "/out.json", "keep me")
      local r, err = workflow.replace(client_for(F), { assetId = d.assetId, newDeviceKey = "new_key_04" },
        fast { out = dir .. "/out.json" })
      assert.is_nil(r)
      assert.matches("exists", err.message)
      assert.equal(0, F.count("replaceDevice"))
      assert.equal("keep me", H.readfile(dir .. "/out.json"))
      H.sh("rm -rf " .. dir)
    end)
  end)

  describe("unknown outcomes", function()
    it("a dropped reply after the replace applied ends reconciled with the right secret", function()
      local F = fake { pub = kp.public_file }
      local d = F.add { deviceKey = "old_key_05" }
      F.faults.replaceDevice = { function(req, FF) FF.apply(req) return nil, TRANSPORT_DROP end }
      local c = client_for(F, { private_key_file = kp.private_file })
      local r = assert(workflow.replace(c, { assetId = d.assetId, newDeviceKey = "new_key_05" }, fast()))
      assert.is_true(r.ok)
      assert.equal("reconciled", r.outcome)
      assert.equal(F.devices[d.assetId].deviceSecret, r.new.deviceSecret)
      assert.equal(1, F.count("replaceDevice"))
      assert.equal("preflight:ok replace:unknown reconcile:replaced deliver:ok verify:ok", step_names(r))
    end)

    it("a 500 before applying: read back unchanged, retry, success", function()
      local F = fake()
      local d = F.add { deviceKey = "old_key_06" }
      F.faults.replaceDevice = { function() return { status = 500, headers = {}, body = "Internal Server Error" } end }
      local o, t = fast()
      local r = assert(workflow.replace(client_for(F, { api_version = "v2.1" }),
        { assetId = d.assetId, newDeviceKey = "new_key_06" }, o))
      assert.equal("replaced", r.outcome)
      assert.equal(2, r.attempts)
      assert.equal(2, F.count("replaceDevice"))
      assert.equal("preflight:ok replace:unknown reconcile:unchanged replace:ok deliver:ok verify:ok", step_names(r))
      assert.is_true(#t.slept >= 2)     -- settle + backoff
      assert.equal(F.devices[d.assetId].deviceSecret, r.new.deviceSecret)
    end)

    it("honours Retry-After of a 429", function()
      local F = fake()
      local d = F.add { deviceKey = "old_key_07" }
      F.faults.replaceDevice = { function()
        return { status = 429, headers = { ["retry-after"] = "7" }, body = "API rate limit exceeded" } end }
      local o, t = fast { settle_ms = 0 }
      local r = assert(workflow.replace(client_for(F), { assetId = d.assetId, newDeviceKey = "new_key_07" }, o))
      assert.equal("replaced", r.outcome)
      local max = 0
      for _, s in ipairs(t.slept) do max = math.max(max, s) end
      assert.is_true(max >= 7)
    end)

    it("a conflict on a retry after an unknown outcome is resolved by a read-back", function()
      -- attempt 1 times out and lands late: the read-back still sees the old key, then it applies
      local F = fake()
      local d = F.add { productKey = "pk_demo", deviceKey = "old_key_08" }
      local pending
      F.faults.replaceDevice = { function(req) pending = req return nil, { kind = "timeout",
        message = "Operation timed out (curl 28)", request_sent = true } end }
      local gets = 0
      F.faults.get = {}
      for i = 1, 10 do F.faults.get[i] = function(req)
        gets = gets + 1
        if gets == 2 and pending then      -- the first read-back answers, then the late request lands
          local res = F.apply(req)
          F.apply(pending)
          pending = nil
          return res
        end
      end end
      local r = assert(workflow.replace(client_for(F, { api_version = "v2.1" }),
        { productKey = "pk_demo", deviceKey = "old_key_08", newDeviceKey = "new_key_08" }, fast()))
      assert.equal("reconciled", r.outcome)
      assert.equal(2, F.count("replaceDevice"))
      assert.matches("replace:unknown reconcile:unchanged replace:failed reconcile:replaced", step_names(r))
      assert.equal(F.devices[d.assetId].deviceSecret, r.new.deviceSecret)
    end)

    it("gives up after max_attempts with the device confirmed unchanged", function()
      local F = fake()
      local d = F.add { deviceKey = "old_key_09" }
      F.faults.replaceDevice = {}
      for i = 1, 5 do F.faults.replaceDevice[i] = function()
        return { status = 503, headers = {}, body = "Service Unavailable" } end end
      local r, err = workflow.replace(client_for(F), { assetId = d.assetId, newDeviceKey = "new_key_09" },
        fast { max_attempts = 3 })
      assert.is_nil(r)
      assert.equal("server", err.kind)
      assert.equal(3, F.count("replaceDevice"))
      assert.equal("failed", err.report.outcome)
      assert.matches("device unchanged", err.message)
      assert.equal("old_key_09", F.devices[d.assetId].deviceKey)
    end)

    it("reports OUTCOME UNKNOWN when the read-back fails too", function()
      local F = fake()
      local d = F.add { deviceKey = "old_key_10" }
      F.faults.replaceDevice = { function(req, FF) FF.apply(req) return nil, TRANSPORT_DROP end }
      F.faults.get = { function() end }   -- preflight passes, then the network is gone
      for i = 2, 10 do F.faults.get[i] = function() return nil, { kind = "transport", message = "refused",
        request_sent = false } end end
      local r, err = workflow.replace(client_for(F), { assetId = d.assetId, newDeviceKey = "new_key_10" }, fast())
      assert.is_nil(r)
      assert.is_true(err.outcome_unknown)
      assert.equal("unknown", err.report.outcome)
      assert.matches("OUTCOME UNKNOWN", tostring(err))
    end)

    it("retries a request that never left without a read-back", function()
      local F = fake()
      local d = F.add { deviceKey = "old_key_11" }
      F.faults.replaceDevice = { function() return nil, { kind = "transport", message = "Couldn't connect (curl 7)",
        request_sent = false } end }
      local r = assert(workflow.replace(client_for(F), { assetId = d.assetId, newDeviceKey = "new_key_11" }, fast()))
      assert.equal("replaced", r.outcome)
      assert.equal("preflight:ok replace:failed replace:ok deliver:ok verify:ok", step_names(r))
    end)

    it("a definite refusal is not retried", function()
      local F = fake()
      local d = F.add { deviceKey = "old_key_12" }
      F.faults.replaceDevice = { function() return H.envelope(nil, 99403, "no permission") end }
      local r, err = workflow.replace(client_for(F), { assetId = d.assetId, newDeviceKey = "new_key_12" }, fast())
      assert.is_nil(r)
      assert.equal("permission", err.kind)
      assert.equal(1, F.count("replaceDevice"))
      assert.equal("refused", err.report.outcome)
    end)
  end)

  describe("the new secret", function()
    it("is read with Get Device when the replace reply's secret does not decrypt", function()
      local F = fake { pub = kp.public_file }
      local d = F.add { deviceKey = "old_key_13" }
      F.faults.replaceDevice = { function(req, FF)
        local res = FF.apply(req)
        local doc = cjson.decode(res.body)
        doc.data.deviceSecret, doc.data.sessionKey = "AAAA", "BBBB"
        res.body = cjson.encode(doc)
        return res
      end }
      local dir = H.tmpdir()
      local r = assert(workflow.replace(client_for(F, { private_key_file = kp.private_file }),
        { assetId = d.assetId, newDeviceKey = "new_key_13" }, fast { out = dir .. "/cred.json" }))
      assert.is_true(r.ok)
      assert.equal(F.devices[d.assetId].deviceSecret, r.new.deviceSecret)
      local rec = cjson.decode(H.readfile(dir .. "/cred.json"))
      assert.equal(F.devices[d.assetId].deviceSecret, rec.deviceSecret)
      assert.matches("not usable", table.concat(r.warnings, " "))
      H.sh("rm -rf " .. dir)
    end)

    it("is read with Get Device when the reply has none (or empty strings)", function()
      for _, shape in ipairs { "none", "empty" } do
        local F = fake { pub = kp.public_file }
        local d = F.add { deviceKey = "old_key_13b" }
        F.faults.replaceDevice = { function(req, FF)
          local res = FF.apply(req)
          local doc = cjson.decode(res.body)
          if shape == "none" then doc.data.deviceSecret, doc.data.sessionKey = nil, nil
          else doc.data.deviceSecret, doc.data.sessionKey = "", "" end
          res.body = cjson.encode(doc)
          return res
        end }
        local r = assert(workflow.replace(client_for(F, { private_key_file = kp.private_file }),
          { assetId = d.assetId, newDeviceKey = "new_key_13b" }, fast()))
        assert.is_true(r.ok, shape)
        assert.equal(F.devices[d.assetId].deviceSecret, r.new.deviceSecret, shape)
      end
    end)

    it("not in hand after bounded reads: not ok, kind decrypt, the encrypted pair delivered, exit 6", function()
      local F = fake { pub = kp.public_file }
      local d = F.add { deviceKey = "old_key_14" }
      -- the key proves itself on the current secret; every secret after the replace is garbage
      F.faults.replaceDevice = { function(req, FF)
        FF.garbage_secret = true
        return FF.apply(req)
      end }
      local dir = H.tmpdir()
      local r = assert(workflow.replace(client_for(F, { private_key_file = kp.private_file }),
        { assetId = d.assetId, newDeviceKey = "new_key_14" }, fast { out = dir .. "/cred.json", read_attempts = 2 }))
      assert.is_false(r.ok)
      assert.equal("replaced", r.outcome)
      assert.is_true(r.secret_missing)
      assert.equal("decrypt", r.error.kind)
      assert.equal(6, require("enos.cli").exit_code(r.error))
      assert.is_nil(r.new.deviceSecret)
      assert.equal("AAAA", r.new.encrypted.deviceSecret)
      assert.equal(4, F.count("get"))       -- the preflight's read, two reads of the secret, the verification
      local rec = cjson.decode(H.readfile(dir .. "/cred.json"))
      assert.equal("AAAA", rec.encrypted.deviceSecret)
      assert.equal("BBBB", rec.encrypted.sessionKey)
      H.sh("rm -rf " .. dir)
    end)

    it("a private key that does not match the application's stops in preflight, before any replace", function()
      local other = H.keypair(1024)           -- (cached per size: another size is another key)
      local F = fake { pub = other.public_file }
      local d = F.add { deviceKey = "old_key_15" }
      local r, err = workflow.replace(client_for(F, { private_key_file = kp.private_file }),
        { assetId = d.assetId, newDeviceKey = "new_key_15" }, fast())
      assert.is_nil(r)
      assert.equal("config", err.kind)
      assert.matches("private key does not decrypt", err.message, 1, true)
      assert.equal("refused", err.report.outcome)
      assert.equal(0, F.count("replaceDevice"))
      assert.equal(1, F.count("get"))              -- proven on the preflight's own read: no extra call
      assert.equal("old_key_15", F.devices[d.assetId].deviceKey)
      assert.not_matches(F.devices[d.assetId].deviceSecret, tostring(err), 1, true)
    end)
  end)

  describe("the reply names the device asked for", function()
    it("a reply naming another asset or key is not used: the device is read back", function()
      for _, lie in ipairs { "assetId", "deviceKey" } do
        local F = fake { pub = kp.public_file }
        local d = F.add { deviceKey = "old_key_16" }
        local other = F.add { deviceKey = "victim_16" }
        F.faults.replaceDevice = { function(req, FF)
          local res = FF.apply(req)
          local doc = cjson.decode(res.body)
          if lie == "assetId" then doc.data.assetId = other.assetId else doc.data.deviceKey = "victim_16" end
          res.body = cjson.encode(doc)
          return res
        end }
        local r = assert(workflow.replace(client_for(F, { private_key_file = kp.private_file }),
          { assetId = d.assetId, newDeviceKey = "new_key_16" }, fast()))
        assert.is_true(r.ok, lie)
        assert.equal("reconciled", r.outcome, lie)
        assert.equal(d.assetId, r.new.assetId, lie)
        assert.equal("new_key_16", r.new.deviceKey, lie)
        assert.equal(F.devices[d.assetId].deviceSecret, r.new.deviceSecret, lie)
        assert.equal(1, F.count("replaceDevice"), lie)
      end
    end)
  end)

  describe("compare-and-swap", function()
    it("a device whose key changed between the preflight and the replace ends conflict, naming the key", function()
      local F = fake()
      local d = F.add { deviceKey = "old_key_17" }
      F.faults.replaceDevice = { function(req, FF)
        FF.devices[d.assetId].deviceKey = "someone_else_17"     -- another operator's replace won meanwhile
        return FF.apply(req)
      end }
      local r, err = workflow.replace(client_for(F), { assetId = d.assetId, newDeviceKey = "new_key_17" }, fast())
      assert.is_nil(r)
      assert.equal("conflict", err.kind)
      assert.equal("conflict", err.report.outcome)
      assert.equal("someone_else_17", err.found_key)
      assert.matches("someone_else_17", err.message, 1, true)
      assert.equal(4, require("enos.cli").exit_code(err))
      assert.equal("someone_else_17", F.devices[d.assetId].deviceKey)       -- not overwritten
      assert.equal(1, F.count("replaceDevice"))
    end)

    it("two concurrent replaces of one asset: exactly one wins, the other ends conflict", function()
      local F = fake()
      local d = F.add { deviceKey = "old_key_18b" }
      local c1, c2 = client_for(F), client_for(F)
      local inner
      F.faults.replaceDevice = { function()
        -- while the first replace is on its way, a second operator runs the whole workflow
        inner = { workflow.replace(c2, { assetId = d.assetId, newDeviceKey = "second_18b" }, fast()) }
      end }
      local r, err = workflow.replace(c1, { assetId = d.assetId, newDeviceKey = "first_18b" }, fast())
      assert.is_true(inner[1].ok)
      assert.equal("second_18b", F.devices[d.assetId].deviceKey)
      assert.is_nil(r)
      assert.equal("conflict", err.kind)
      assert.equal("second_18b", err.found_key)
    end)
  end)

  describe("gateways", function()
    it("records sub-devices and re-attaches the ones the replace dropped", function()
      local F = fake()
      local gw = F.add { productKey = "pk_gateway", productType = "Gateway", deviceKey = "gw_old" }
      local s1 = F.add { deviceKey = "sub_1", gateway = gw.assetId }
      F.add { deviceKey = "sub_2", gateway = gw.assetId }
      F.faults.replaceDevice = { function(req, FF)
        local res = FF.apply(req)
        FF.subs[gw.assetId] = { s1.assetId }       -- the platform lost one
        return res
      end }
      local r = assert(workflow.replace(client_for(F), { assetId = gw.assetId, newDeviceKey = "gw_new" }, fast()))
      assert.is_true(r.ok)
      assert.same({ before = 2, after = 2, reattached = 1 }, r.subdevices)
      assert.equal(1, F.count("addSubDevice"))
      assert.matches("re%-attached", r.steps[#r.steps].detail)
    end)

    it("leaves sub-devices alone when they stayed", function()
      local F = fake()
      local gw = F.add { productKey = "pk_gateway", productType = "Gateway", deviceKey = "gw_old2" }
      F.add { deviceKey = "sub_3", gateway = gw.assetId }
      local r = assert(workflow.replace(client_for(F), { assetId = gw.assetId, newDeviceKey = "gw_new2" }, fast()))
      assert.same({ before = 1, after = 1, reattached = 0 }, r.subdevices)
      assert.equal(0, F.count("addSubDevice"))
    end)
  end)

  it("a failed verification still returns the report with the credentials (not nil)", function()
    local F = fake()
    local d = F.add { deviceKey = "old_key_14" }
    F.faults.replaceDevice = { function(req, FF)
      local res = FF.apply(req)
      FF.devices[d.assetId].status = "disable"
      return res
    end }
    local r, err = workflow.replace(client_for(F, { api_version = "v2.1" }),
      { assetId = d.assetId, newDeviceKey = "new_key_14" }, fast())
    assert.is_nil(err)
    assert.is_false(r.ok)
    assert.equal("replaced", r.outcome)
    assert.is_true(r.error.verify_failed)
    assert.matches("status is disable", tostring(r.error))
    assert.is_string(r.new.deviceSecret)
  end)

  describe("deliver", function()
    local dir
    before_each(function() dir = H.tmpdir() end)
    after_each(function() H.sh("rm -rf " .. dir) end)

    for _, fmt in ipairs { "json", "env", "text" } do
      it("writes a " .. fmt .. " file with mode 0600", function()
        local F = fake()
        local d = F.add { deviceKey = "old_key_" .. fmt }
        local path = dir .. "/cred." .. fmt
        local r = assert(workflow.replace(client_for(F, { api_version = "v2.1" }),
          { assetId = d.assetId, newDeviceKey = "new_key_" .. fmt }, fast { out = path, format = fmt }))
        assert.equal("600", (H.sh("stat -c %a " .. path):gsub("%s", "")))
        local text = H.readfile(path)
        local secret = F.devices[d.assetId].deviceSecret
        assert.truthy(text:find(secret, 1, true))
        if fmt == "json" then
          local rec = cjson.decode(text)
          assert.equal(d.assetId, rec.assetId)
          assert.equal("new_key_json", rec.deviceKey)
          assert.equal(secret, rec.deviceSecret)
          assert.equal("https://gw.example.com", rec.endpoint)
          assert.equal(ORG, rec.orgId)
        elseif fmt == "env" then
          assert.matches("ENOS_DEVICE_SECRET=" .. secret, text, 1, true)
          assert.matches("ENOS_ASSET_ID=" .. d.assetId, text, 1, true)
        else
          assert.matches("deviceSecret: +" .. secret, text)
        end
        assert.equal(path, r.delivered.path)
        assert.equal("", H.sh("ls -A " .. dir .. " | grep tmp || true"))   -- no temp files left
      end)
    end

    it("write_private refuses to replace an existing file unless overwrite", function()
      local path = dir .. "/x.json"
      H.writefile(path, "old")
      local ok, err = workflow.write_private(path, "new", false)
      assert.is_nil(ok)
      assert.matches("exists", err.message)
      assert.equal("old", H.readfile(path))
      assert(workflow.write_private(path, "new", true))
      assert.equal("new", H.readfile(path))
      assert.equal("600", (H.sh("stat -c %a " .. path):gsub("%s", "")))
    end)

    it("write_private refuses a dangling symlink in the way", function()
      local path = dir .. "/link.json"
      H.sh("ln -s " .. dir .. "/nowhere " .. path)
      assert.is_nil((workflow.write_private(path, "x", false)))
      assert.is_nil(io.open(dir .. "/nowhere", "rb"))
    end)

    it("a delivery failure after the replace keeps the secret in the report", function()
      local F = fake()
      local d = F.add { deviceKey = "old_key_15" }
      local path = dir .. "/sub/cred.json"
      H.sh("mkdir " .. dir .. "/sub")
      F.faults.replaceDevice = { function(req, FF)
        H.sh("rmdir " .. dir .. "/sub && touch " .. dir .. "/sub")   -- the directory vanishes mid-flight
        return FF.apply(req)
      end }
      local r = assert(workflow.replace(client_for(F, { api_version = "v2.1" }),
        { assetId = d.assetId, newDeviceKey = "new_key_15" }, fast { out = path }))
      assert.is_false(r.ok)
      assert.equal("replaced", r.outcome)
      assert.is_true(r.error.deliver_failed)
      assert.equal(F.devices[d.assetId].deviceSecret, r:record().deviceSecret)
    end)
  end)

  describe("wait_active", function()
    it("polls with backoff until the device comes online", function()
      local F = fake()
      local d = F.add { deviceKey = "old_key_16" }
      local polls = 0
      local o, t = fast { wait_active = 60 }
      F.faults.get = {}
      for i = 1, 20 do F.faults.get[i] = function()
        if t.now > 1000 then polls = polls + 1 end
        if polls == 3 then F.devices[d.assetId].status = "online" end
      end end
      local r = assert(workflow.replace(client_for(F), { assetId = d.assetId, newDeviceKey = "new_key_16" }, o))
      assert.is_true(r.wait.online)
      assert.is_true(r.ok)
      assert.equal("wait:ok", step_names(r):match("wait:%w+"))
      assert.is_true(t.slept[2] > t.slept[1])    -- interval grows
    end)

    it("reports a timeout when the device stays inactive", function()
      local F = fake()
      local d = F.add { deviceKey = "old_key_17" }
      local o = fast { wait_active = 30 }
      local r = assert(workflow.replace(client_for(F), { assetId = d.assetId, newDeviceKey = "new_key_17" }, o))
      assert.is_false(r.wait.online)
      assert.is_true(r.wait.waited_ms >= 30000 and r.wait.waited_ms < 31000)
      assert.equal("wait:timeout", step_names(r):match("wait:%w+"))
      assert.is_true(r.ok)      -- the replace is done; the caller decides what a late device means
    end)
  end)

  it("dry_run prepares the signed requests, redacted, and sends no replace", function()
    local F = fake { pub = kp.public_file }
    local d = F.add { deviceKey = "old_key_18" }
    local c = client_for(F, { private_key_file = kp.private_file })
    local r = assert(workflow.replace(c, { assetId = d.assetId, newDeviceKey = "new_key_18" }, fast { dry_run = true }))
    assert.equal("dry_run", r.outcome)
    assert.equal(0, F.count("replaceDevice"))
    local text = r.requests[1].text
    assert.matches("POST https://gw.example.com/connect%-service/v2.4/devices%?", text)
    assert.matches("action=replaceDevice", text)
    -- by compare-and-swap: productKey + the key the preflight saw, not the assetId
    assert.matches("deviceKey=old_key_18", text, 1, true)
    assert.matches("productKey=pk_demo", text, 1, true)
    assert.not_matches("assetId=", text, 1, true)
    assert.matches('{"newDeviceKey":"new_key_18","requireSecret":true}', text, 1, true)
    assert.matches("apim-signature: <redacted>", text, 1, true)
    assert.not_matches("tok-1", text, 1, true)
    assert.not_matches("super-secret-key-xyz", text, 1, true)
    assert.equal("old_key_18", F.devices[d.assetId].deviceKey)
  end)

  it("confirm returning false aborts before the replace", function()
    local F = fake()
    local d = F.add { deviceKey = "old_key_19" }
    local plan
    local r, err = workflow.replace(client_for(F), { assetId = d.assetId, newDeviceKey = "new_key_19" },
      fast { confirm = function(p) plan = p return false end })
    assert.is_nil(r)
    assert.is_true(err.aborted)
    assert.equal("aborted", err.report.outcome)
    assert.equal("old_key_19", plan.deviceKey)
    assert.equal("new_key_19", plan.newDeviceKey)
    assert.equal(0, F.count("replaceDevice"))
  end)

  it("rejects bad targets and options, and raises on misuse", function()
    local F = fake()
    local c = client_for(F)
    local _, err = workflow.replace(c, { assetId = "a1", newDeviceKey = "x" })
    assert.equal("invalid_argument", err.kind)
    _, err = workflow.replace(c, { assetId = "a1", productKey = "p", newDeviceKey = "good_key" })
    assert.equal("invalid_argument", err.kind)
    _, err = workflow.replace(c, { productKey = "p", newDeviceKey = "good_key" })
    assert.equal("invalid_argument", err.kind)
    _, err = workflow.replace(c, { assetId = "a1", newDeviceKey = "good_key" }, { bogus = 1 })
    assert.equal("bogus", err.field)
    _, err = workflow.replace(c, { assetId = "a1", newDeviceKey = "good_key" }, { format = "xml" })
    assert.equal("format", err.field)
    assert.has_error(function() workflow.replace(c, "a1") end)
    assert.equal(0, #F.stub.requests)
  end)
end)

-- ---------------------------------------------------------------- after the replace

describe("enos.workflow.replace: the steps after the replace", function()
  local dir, ca
  local function csr_of(name, kind)
    local key, csr = dir .. "/" .. name .. ".key", dir .. "/" .. name .. ".csr"
    local newkey = kind == "ec" and "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1" or "-newkey rsa:2048"
    H.sh(("openssl req -new %s -nodes -keyout %s -out %s -subj /CN=%s 2>/dev/null"):format(newkey, key, csr, name))
    return H.readfile(csr), key
  end
  setup(function()
    dir = H.tmpdir()
    H.sh(("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout %s/ca.key -out %s/ca.pem " ..
      "-days 2 -subj /CN=fake-ca 2>/dev/null"):format(dir, dir))
    ca = H.readfile(dir .. "/ca.pem")
  end)
  local function with_certs(F)
    F.ca_pem = ca
    function F.sign_csr(csr, sn)
      local f = dir .. "/req-" .. sn .. ".csr"
      H.writefile(f, csr)
      H.sh(("openssl x509 -req -in %s -CA %s/ca.pem -CAkey %s/ca.key -set_serial %s -days 1 -out %s.crt 2>/dev/null")
        :format(f, dir, dir, sn, f))
      return H.readfile(f .. ".crt")
    end
    return F
  end
  local function order(F, wanted)
    local out = {}
    for _, a in ipairs(F.calls) do if wanted[a] then out[#out + 1] = a end end
    return table.concat(out, " ")
  end

  it("a sub-device whose link the replace dropped is linked again; the record names its gateway", function()
    local F = fake()
    local gw = F.add { deviceKey = "gw_01", productType = "Gateway", productKey = "pk_gateway" }
    local d = F.add { deviceKey = "sub_old_01", gateway = gw.assetId }
    F.drop_link = true
    local c = client_for(F, { api_version = "v2.1" })
    local r = assert(workflow.replace(c, { assetId = d.assetId, newDeviceKey = "sub_new_01" }, fast()))
    assert.is_true(r.ok, tostring(r.error))
    assert.equal("preflight:ok replace:ok deliver:ok link:ok verify:ok", step_names(r))
    assert.equal(gw.assetId, r.gateway.assetId)
    assert.is_true(r.gateway.relinked)
    assert.same({ d.assetId }, F.subs[gw.assetId])
    assert.equal("getGateway replaceDevice getGateway addSubDevice getGateway",
      order(F, { getGateway = true, replaceDevice = true, addSubDevice = true }))
    local rec = r:record()
    assert.equal(gw.assetId, rec.gatewayAssetId)
    assert.equal("gw_01", rec.gatewayDeviceKey)
    assert.matches("ENOS_GATEWAY_ASSET_ID=" .. gw.assetId, workflow.render_record(rec, "env"), 1, true)
  end)

  it("a sub-device whose link the replace kept: checked once, not added again", function()
    local F = fake()
    local gw = F.add { deviceKey = "gw_02", productType = "Gateway", productKey = "pk_gateway" }
    local d = F.add { deviceKey = "sub_old_02", gateway = gw.assetId }
    local c = client_for(F, { api_version = "v2.1" })
    local r = assert(workflow.replace(c, { assetId = d.assetId, newDeviceKey = "sub_new_02" }, fast()))
    assert.is_true(r.ok)
    assert.is_false(r.gateway.relinked)
    assert.equal(0, F.count("addSubDevice"))
    assert.equal(2, F.count("getGateway"))
  end)

  it("without check_gateway no Get Gateway is sent", function()
    local F = fake()
    local d = F.add { deviceKey = "plain_old_03" }
    local c = client_for(F, { api_version = "v2.1" })
    assert(workflow.replace(c, { assetId = d.assetId, newDeviceKey = "plain_new_03" },
      fast { check_gateway = false, check_certificates = false }))
    assert.equal(0, F.count("getGateway"))
    assert.equal(0, F.count("list"))
  end)

  it("a certificate device: valid certificates and no CSR refuse the replace, nothing sent", function()
    local F = with_certs(fake())
    local d = F.add { deviceKey = "crt_old_04" }
    F.certs = { [d.assetId] = { { certSN = "12345678901234567890", cert = ca, certStatus = 0 } } }
    local c = client_for(F, { api_version = "v2.1" })
    local r, err = workflow.replace(c, { assetId = d.assetId, newDeviceKey = "crt_new_04" }, fast())
    assert.is_nil(r)
    assert.equal("csr", err.field)
    assert.matches("1 valid certificate", err.message, 1, true)
    assert.equal(0, F.count("replaceDevice"))
    assert.equal("crt_old_04", F.devices[d.assetId].deviceKey)
  end)

  it("a certificate swap: the old valid certificate revoked (superseded, exact serial), one issued for the CSR, " ..
    "delivered with the record", function()
    local F = with_certs(fake())
    local d = F.add { deviceKey = "crt_old_05" }
    F.certs = { [d.assetId] = {
      { certSN = "12345678901234567890123", cert = ca, certStatus = 0 },
      { certSN = "555", cert = ca, certStatus = 1 },            -- revoked long ago: left alone
    } }
    local csr = csr_of("unit05")
    local out = dir .. "/crt05.json"
    local c = client_for(F, { api_version = "v2.1" })
    local r = assert(workflow.replace(c, { assetId = d.assetId, newDeviceKey = "crt_new_05" },
      fast { csr = csr, out = out }))
    assert.is_true(r.ok, tostring(r.error))
    assert.equal("preflight:ok replace:ok deliver:ok certificate:ok verify:ok", step_names(r))
    assert.same({ "12345678901234567890123" }, F.revoked)
    assert.equal(4, F.certs[d.assetId][1].revokerReason)
    assert.equal("list replaceDevice list revoke apply", order(F, { list = true, replaceDevice = true, revoke = true,
      apply = true }))
    local issued = F.certs[d.assetId][3]
    assert.equal(issued.certSN, r.certificates.issued)
    local rec = cjson.decode(H.readfile(out))
    assert.equal(issued.cert, rec.certificate)
    assert.equal(issued.certSN, rec.certSn)
    assert.equal(ca, rec.caCertificate)
    assert.equal(F.devices[d.assetId].deviceSecret, rec.deviceSecret)
    assert.equal("600", H.sh("stat -c %a " .. out):match("%d+"))
  end)

  it("a CSR that is not usable is refused before any request", function()
    local F = with_certs(fake())
    local d = F.add { deviceKey = "crt_old_06" }
    local c = client_for(F, { api_version = "v2.1" })
    local _, key = csr_of("unit06")
    local _, err = workflow.replace(c, { assetId = d.assetId, newDeviceKey = "crt_new_06" },
      fast { csr = H.readfile(key) })
    assert.equal("csr", err.field)
    assert.matches("private key", err.message, 1, true)
    local csr = csr_of("unit06b")
    local bad = csr:gsub("\n(...)(.)", function(a, b) return "\n" .. a .. (b == "A" and "B" or "A") end, 1)
    _, err = workflow.replace(c, { assetId = d.assetId, newDeviceKey = "crt_new_06" }, fast { csr = bad })
    assert.equal("csr", err.field)
    _, err = workflow.replace(c, { assetId = d.assetId, newDeviceKey = "crt_new_06" },
      fast { csr = csr, cert_authority = "ECC" })
    assert.equal("cert_authority", err.field)
    assert.equal(0, #F.stub.requests)
  end)

  it("an issue that fails leaves the device replaced and the secret delivered; finish does what is left, once",
    function()
    local F = with_certs(fake())
    local d = F.add { deviceKey = "crt_old_07" }
    F.certs = { [d.assetId] = { { certSN = "777", cert = ca, certStatus = 0 } } }
    F.faults.apply = { function() return H.envelope(nil, 99500, "Internal error") end }
    local csr = csr_of("unit07", "ec")
    local out = dir .. "/crt07.json"
    local c = client_for(F, { api_version = "v2.1" })
    local r = assert(workflow.replace(c, { productKey = "pk_demo", deviceKey = "crt_old_07",
      newDeviceKey = "crt_new_07" }, fast { csr = csr, out = out }))
    assert.is_false(r.ok)
    assert.equal("certificate", r.error.step)
    assert.same({ "777" }, F.revoked)                       -- the old one is revoked: the old unit is out
    assert.equal(F.devices[d.assetId].deviceSecret, cjson.decode(H.readfile(out)).deviceSecret)
    -- the same command again is refused (it was replaced), and says how to finish
    local _, err = workflow.replace(c, { productKey = "pk_demo", deviceKey = "crt_old_07",
      newDeviceKey = "crt_new_07" }, fast { csr = csr, out = out, overwrite = true })
    assert.matches("finish", err.message, 1, true)
    -- finish on another key than the device has: refused, nothing sent but reads
    local _, ferr = workflow.replace(c, { assetId = d.assetId, newDeviceKey = "crt_typo_07" },
      fast { csr = csr, out = out, overwrite = true, finish = true })
    assert.equal("conflict", ferr.kind)
    assert.matches("nothing to finish", ferr.message, 1, true)
    -- finish: no second replace, no second revoke, the certificate issued (ECC, from the CSR's key)
    local replaces = F.count("replaceDevice")
    local r2 = assert(workflow.replace(c, { productKey = "pk_demo", deviceKey = "crt_old_07",
      newDeviceKey = "crt_new_07" }, fast { csr = csr, out = out, overwrite = true, finish = true }))
    assert.is_true(r2.ok, tostring(r2.error))
    assert.equal("finished", r2.outcome)
    assert.equal(replaces, F.count("replaceDevice"))
    assert.same({ "777" }, F.revoked)
    local applied
    for _, q in ipairs(F.stub.requests) do if q.url:find("action=apply", 1, true) then applied = q end end
    assert.equal("ECC", cjson.decode(applied.body).issueAuthority)
    assert.equal(730, cjson.decode(applied.body).validDay)
    local rec = cjson.decode(H.readfile(out))
    assert.equal(F.devices[d.assetId].deviceSecret, rec.deviceSecret)
    assert.equal(F.certs[d.assetId][2].cert, rec.certificate)
    -- finish again: the new unit's certificate is recognised by its key and kept: nothing revoked or issued
    local applies = F.count("apply")
    local r3 = assert(workflow.replace(c, { productKey = "pk_demo", deviceKey = "crt_old_07",
      newDeviceKey = "crt_new_07" }, fast { csr = csr, out = out, overwrite = true, finish = true }))
    assert.is_true(r3.ok, tostring(r3.error))
    assert.is_true(r3.certificates.reused)
    assert.equal(applies, F.count("apply"))
    assert.same({ "777" }, F.revoked)
  end)

  it("tags: merged into the asset's own, with replacedAt and replacedFrom; timezone and name sent back", function()
    local F = fake()
    local d = F.add { deviceKey = "tag_old_08" }
    F.devices[d.assetId].deviceTags = { owner = "ops" }
    F.devices[d.assetId].timezone = "+01:00"
    local c = client_for(F, { api_version = "v2.1" })
    local r = assert(workflow.replace(c, { assetId = d.assetId, newDeviceKey = "tag_new_08" },
      fast { tags = { site = "North", ticket = "CHG-42" }, stamp = true }))
    assert.is_true(r.ok, tostring(r.error))
    assert.equal("preflight:ok replace:ok deliver:ok tag:ok verify:ok", step_names(r))
    local u = F.updates[1]
    assert.equal("+01:00", u.timezone)
    assert.equal("dev " .. d.assetId:match("%d+"), u.deviceName.defaultValue)
    assert.equal("ops", u.deviceTags.owner)
    assert.equal("North", u.deviceTags.site)
    assert.equal("CHG-42", u.deviceTags.ticket)
    assert.equal("tag_old_08", u.deviceTags.replacedFrom)
    assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%dZ$", u.deviceTags.replacedAt)
    -- bad tags are refused before anything is sent
    local n = #F.stub.requests
    local _, err = workflow.replace(c, { assetId = d.assetId, newDeviceKey = "tag_new_08b" },
      fast { tags = { ["bad name"] = "x" } })
    assert.equal("tags", err.field)
    _, err = workflow.replace(c, { assetId = d.assetId, newDeviceKey = "tag_new_08b" },
      fast { tags = { note = "it's" } })
    assert.equal("tags", err.field)
    _, err = workflow.replace(c, { assetId = d.assetId, newDeviceKey = "tag_new_08b" },
      fast { tags = { note = "bad \255 byte" } })
    assert.equal("tags", err.field)
    assert.equal(n, #F.stub.requests)
  end)
end)
