-- enos-sim's own specs: real nginx, real HTTP(S) via curl, crypto via luaossl / the openssl command.
-- Nothing here uses enos.core, so the simulator is checked independently of the client.
local sim = dofile("spec/sim_helper.lua")
local cjson = require "cjson"
local pkey = require "openssl.pkey"
local cipher = require "openssl.cipher"

local ORG = "o15724268424841"
local DEV = "/connect-service/v2.4/devices"
local DEV21 = "/connect-service/v2.1/devices"
local TOPO = "/connect-service/v2.4/device-topos"

-- pure-Lua base64 / hex decoding (5.1 and 5.4: arithmetic only)
local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local function unbase64(s, url)
  if url then s = s:gsub("-", "+"):gsub("_", "/") end
  s = s:gsub("[^%w%+/]", "")
  local out, bits, nbits = {}, 0, 0
  for i = 1, #s do
    bits = bits * 64 + (B64:find(s:sub(i, i), 1, true) - 1)
    nbits = nbits + 6
    if nbits >= 8 then
      nbits = nbits - 8
      local b = math.floor(bits / 2 ^ nbits)
      out[#out + 1] = string.char(b)
      bits = bits - b * 2 ^ nbits
    end
  end
  return table.concat(out)
end
local function unhex(s) return (s:gsub("%x%x", function(h) return string.char(tonumber(h, 16)) end)) end

local function decode(s, how)
  if how == "hex" then return unhex(s) end
  return unbase64(s, how == "base64url")
end

local function write(path, s)
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
end

--- Decrypt a V2.4 pair (deviceSecret, sessionKey) with the private key, per scheme.
local function decrypt(scheme, priv_pem, device_secret, session_key)
  local enc = decode(session_key, scheme.encoding)
  local material
  if scheme.rsa_padding == "oaep-sha256" then
    local kf, inf = os.tmpname(), os.tmpname()
    write(kf, priv_pem)
    write(inf, enc)
    local p = io.popen("openssl pkeyutl -decrypt -inkey " .. kf .. " -in " .. inf ..
      " -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha256 -pkeyopt rsa_mgf1_md:sha256")
    material = p:read("*a")
    p:close()
    os.remove(kf); os.remove(inf)
  else
    local pad = scheme.rsa_padding == "oaep" and pkey.RSA_PKCS1_OAEP_PADDING or pkey.RSA_PKCS1_PADDING
    material = pkey.new(priv_pem):decrypt(enc, { rsaPadding = pad })
  end
  local key = material
  if scheme.key_format == "base64" then key = unbase64(material) elseif scheme.key_format == "hex" then key = unhex(material) end
  assert(#key * 8 == scheme.key_bits, "AES key has " .. #key .. " bytes")
  local ct = decode(device_secret, scheme.encoding)
  local name = "aes-" .. scheme.key_bits .. "-" .. scheme.aes_mode
  if scheme.aes_mode == "ecb" then
    return cipher.new(name):decrypt(key):final(ct)
  elseif scheme.aes_mode == "cbc" then
    return cipher.new(name):decrypt(key, ct:sub(1, 16)):final(ct:sub(17))
  end
  local c = cipher.new(name):decrypt(key, ct:sub(1, 12))
  local body = c:update(ct:sub(13, -17))
  c:setTag(ct:sub(-16))
  assert(c:final(), "GCM tag did not verify")
  return body
end

local DEFAULT_SCHEME = { rsa_padding = "pkcs1", aes_mode = "ecb", key_format = "raw", encoding = "base64", key_bits = 128 }
local SHA256_SCHEME = { rsa_padding = "oaep-sha256", aes_mode = "cbc", key_format = "hex", encoding = "hex", key_bits = 192 }

local priv, pub = sim.keypair(2048)

describe("enos-sim", function()
  local h
  local APP_NOKEY = { access_key = "ak-nokey", secret_key = "sk-nokey" }
  local APP_OTHER = { access_key = "ak-other", secret_key = "sk-other", orgs = { "o_other" } }
  local APP_SHA = { access_key = "ak-sha", secret_key = "sk-sha", public_key = pub, secret_scheme = SHA256_SCHEME }

  setup(function()
    h = sim.start {
      config = {
        apps = { { access_key = "ak-main", secret_key = "sk-main", public_key = pub }, APP_NOKEY, APP_OTHER, APP_SHA },
        orgs = { ORG, "o_other" },
      },
      workers = 2,
    }
  end)
  teardown(function() if h then h:stop() end end)
  before_each(function()
    local st = h:admin("POST", "/reset")
    assert.equal(200, st)
  end)

  local function seed(dev) return h:seed(dev) end
  local function admin_dev(asset_id) return h:device(asset_id) end

  describe("token service", function()
    it("issues a token and returns the same one while it is valid", function()
      local st, r = h:token_request("get")
      assert.equal(200, st)
      assert.equal(0, r.status)
      assert.equal("apim-token-service", r.business)
      assert.is_string(r.data.accessToken)
      assert.is_true(r.data.expire > 7000 and r.data.expire <= 7200)
      local _, r2 = h:token_request("get")
      assert.equal(r.data.accessToken, r2.data.accessToken)
    end)

    it("answers 1003 for a wrong encryption, 1002 for an unknown appKey, 1202 when empty", function()
      local _, r = h:token_request("get", { access_key = "ak-main", secret_key = "wrong" })
      assert.equal(1003, r.status)
      _, r = h:token_request("get", { access_key = "nobody", secret_key = "x" })
      assert.equal(1002, r.status)
      local st, raw = sim.http { method = "POST", url = h.url .. "/apim-token-service/v2.0/token/get",
        headers = { ["Content-Type"] = "application/json" }, body = '{"appKey":"ak-main"}' }
      assert.equal(200, st)
      assert.equal(1202, cjson.decode(raw).status)
    end)

    it("answers 1001 when the same encryption is sent again", function()
      local ts = sim.now_ms()
      local body = cjson.encode { appKey = "ak-main", timestamp = ts,
        encryption = sim.sha256_hex("ak-main" .. string.format("%d", ts) .. "sk-main") }
      local req = { method = "POST", url = h.url .. "/apim-token-service/v2.0/token/get",
        headers = { ["Content-Type"] = "application/json" }, body = body }
      local _, raw1 = sim.http(req)
      assert.equal(0, cjson.decode(raw1).status)
      local _, raw2 = sim.http(req)
      assert.equal(1001, cjson.decode(raw2).status)
    end)

    it("refreshes a valid token and answers 1203 for an expired one", function()
      local tok = h:token(nil, true)
      local _, r = h:token_request("refresh", nil, { accessToken = tok })
      assert.equal(0, r.status)
      assert.not_equal(tok, r.data.accessToken)
      h:admin("POST", "/tokens/expire")
      local _, r2 = h:token_request("refresh", nil, { accessToken = r.data.accessToken })
      assert.equal(1203, r2.status)
    end)
  end)

  describe("signature", function()
    local dev
    before_each(function() dev = seed { productKey = "pk_demo", deviceKey = "sig_dev_01" } end)

    it("accepts a correctly signed GET", function()
      local st, r = h:call("GET", DEV, { action = "get", orgId = ORG, assetId = dev.assetId })
      assert.equal(200, st)
      assert.equal(0, r.code)
      assert.equal("sig_dev_01", r.data.deviceKey)
    end)

    it("rejects a body with one changed byte with HTTP 401 signature mismatch", function()
      local body = '{"expression":"deviceKey = \'sig_dev_01\'"}'
      local st, r = h:call("POST", DEV, { action = "search", orgId = ORG }, body)
      assert.equal(200, st)
      assert.equal(1, r.pagination.totalSize)
      st, r = h:call("POST", DEV, { action = "search", orgId = ORG }, body, {
        mutate = function(req) req.body = req.body:gsub("sig_dev_01", "sig_dev_02") end })
      assert.equal(401, st)
      assert.equal("signature mismatch", r.msg)
      assert.equal("signature_mismatch", r.reason)
    end)

    it("verifies a body larger than nginx's memory buffer (spooled to a file)", function()
      local body = '{"expression":"deviceKey = \'sig_dev_01\'' .. string.rep(" ", 1536 * 1024) .. '"}'
      local st, r = h:call("POST", DEV, { action = "search", orgId = ORG }, body)
      assert.equal(200, st)
      assert.equal(1, r.pagination.totalSize)
      st = h:call("POST", DEV, { action = "search", orgId = ORG }, body, {
        mutate = function(req) req.body = req.body:sub(1, -3) .. ' "}' end })
      assert.equal(401, st)
    end)

    it("accepts a reordered query string but rejects a changed parameter value", function()
      local params = { action = "get", orgId = ORG, assetId = dev.assetId }
      local reordered = "assetId=" .. dev.assetId .. "&orgId=" .. ORG .. "&action=get"
      local st, r = h:call("GET", DEV, params, nil, { query = reordered })
      assert.equal(200, st)
      assert.equal(0, r.code)
      st, r = h:call("GET", DEV, params, nil, { query = "action=get&orgId=" .. ORG .. "&assetId=XXXXXXXX" })
      assert.equal(401, st)
      assert.equal("signature mismatch", r.msg)
    end)

    it("signs decoded query values", function()
      local st, r = h:call("GET", DEV, { action = "get", orgId = ORG, productKey = "pk_demo", deviceKey = "sig_dev_01" },
        nil, { query = "action=get&orgId=" .. ORG .. "&productKey=pk%5Fdemo&deviceKey=sig%5Fdev%5F01" })
      assert.equal(200, st)
      assert.equal(0, r.code)
    end)

    it("rejects a timestamp outside ±5 minutes and accepts one inside", function()
      local params = { action = "get", orgId = ORG, assetId = dev.assetId }
      local st, r = h:call("GET", DEV, params, nil, { timestamp = sim.now_ms() - 6 * 60 * 1000 })
      assert.equal(401, st)
      assert.equal("timestamp_skew", r.reason)
      st, r = h:call("GET", DEV, params, nil, { timestamp = sim.now_ms() + 6 * 60 * 1000 })
      assert.equal(401, st)
      assert.equal("timestamp_skew", r.reason)
      st = h:call("GET", DEV, params, nil, { timestamp = sim.now_ms() - 4 * 60 * 1000 })
      assert.equal(200, st)
    end)

    it("tells an unknown or expired token apart from a bad signature", function()
      local params = { action = "get", orgId = ORG, assetId = dev.assetId }
      local st, r = h:call("GET", DEV, params, nil, { token = "APP_not_a_token" })
      assert.equal(401, st)
      assert.equal("access token invalid or expired", r.msg)
      assert.equal("token_invalid", r.reason)
      h:token(nil, true)
      h:admin("POST", "/tokens/expire")
      st, r = h:call("GET", DEV, params, nil, { no_retry = true })
      assert.equal(401, st)
      assert.equal("access token invalid or expired", r.msg)
      assert.equal("token_expired", r.reason)
      local st2, r2 = h:token_request("get")
      assert.equal(0, r2.status)
      assert.equal(200, st2)
      st = h:call("GET", DEV, params, nil, { token = r2.data.accessToken })
      assert.equal(200, st)
    end)

    it("rejects a wrong secret key", function()
      local st, r = h:call("GET", DEV, { action = "get", orgId = ORG, assetId = dev.assetId }, nil,
        { app = { access_key = "ak-main", secret_key = "sk-wrong" }, token = h:token(nil, true) })
      assert.equal(401, st)
      assert.equal("signature mismatch", r.msg)
    end)
  end)

  describe("replaceDevice", function()
    local dev
    before_each(function() dev = seed { productKey = "pk_demo", deviceKey = "old_key_01", status = "online" } end)

    local function replace(params, body, opts)
      params.action = "replaceDevice"
      params.orgId = params.orgId or ORG
      return h:call("POST", DEV, params, body, opts)
    end

    it("replaces by assetId: new key, same assetId, new secret, inactive", function()
      local st, r = replace({ assetId = dev.assetId }, { newDeviceKey = "new_key_01" })
      assert.equal(200, st)
      assert.equal(0, r.code)
      assert.equal("OK", r.msg)
      assert.is_string(r.requestId)
      assert.same({ assetId = dev.assetId, productKey = "pk_demo", deviceKey = "new_key_01" }, r.data)
      local after = admin_dev(dev.assetId)
      assert.equal("new_key_01", after.deviceKey)
      assert.equal("inactive", after.status)
      assert.equal(0, after.activeTime)
      assert.not_equal(dev.deviceSecret, after.deviceSecret)
      assert.equal(20, #after.deviceSecret)
      local _, g = h:call("GET", DEV, { action = "get", orgId = ORG, productKey = "pk_demo", deviceKey = "old_key_01" })
      assert.equal(99400, g.code)
      assert.matches("does not exist", g.msg)
    end)

    it("replaces by productKey + deviceKey", function()
      local _, r = replace({ productKey = "pk_demo", deviceKey = "old_key_01" }, { newDeviceKey = "new.key-02" })
      assert.equal(0, r.code)
      assert.equal(dev.assetId, r.data.assetId)
      assert.equal("new.key-02", r.data.deviceKey)
    end)

    it("answers every documented error", function()
      seed { productKey = "pk_demo", deviceKey = "taken_key" }
      local _, r = replace({ assetId = dev.assetId }, { newDeviceKey = "taken_key" })
      assert.same({ 11702, "DeviceKey existed" }, { r.code, r.msg })
      assert.equal(cjson.null, r.data)
      _, r = replace({ assetId = dev.assetId }, { newDeviceKey = "old_key_01" })
      assert.same({ 11704, "DeviceKey is repetitive" }, { r.code, r.msg })
      _, r = replace({ assetId = "NoSuchId" }, { newDeviceKey = "whatever" })
      assert.equal(99400, r.code)
      assert.matches("does not exist", r.msg)
      _, r = replace({ productKey = "pk_demo", deviceKey = "nope_nope" }, { newDeviceKey = "whatever" })
      assert.equal(99400, r.code)
      assert.matches("does not exist", r.msg)
      _, r = replace({ assetId = dev.assetId }, { newDeviceKey = "bad key!" })
      assert.equal(99400, r.code)
      assert.matches("newDeviceKey", r.msg)
      _, r = replace({ assetId = dev.assetId }, { newDeviceKey = "abc" })
      assert.equal(99400, r.code)
      _, r = replace({ assetId = dev.assetId }, {})
      assert.equal(99400, r.code)
      assert.matches("newDeviceKey", r.msg)
      _, r = replace({ assetId = dev.assetId }, { newDeviceKey = "fresh_key", requireSecret = true }, { app = APP_NOKEY })
      assert.same({ 11858, "Unable to find public key" }, { r.code, r.msg })
      assert.equal("old_key_01", admin_dev(dev.assetId).deviceKey)  -- nothing applied
      _, r = replace({ assetId = dev.assetId, orgId = "o_nowhere" }, { newDeviceKey = "fresh_key" })
      assert.same({ 99400, "Invalid arguments: orgId does not exist" }, { r.code, r.msg })
      _, r = replace({ assetId = dev.assetId, orgId = "o_other" }, { newDeviceKey = "fresh_key" })
      assert.equal(99400, r.code)  -- exists, but the device is in another org
      _, r = replace({ assetId = dev.assetId }, { newDeviceKey = "fresh_key" }, { app = APP_OTHER })
      assert.equal(99403, r.code)
    end)

    it("returns the new secret encrypted (enos-v2.4) with requireSecret", function()
      local _, r = replace({ assetId = dev.assetId }, { newDeviceKey = "new_key_03", requireSecret = true })
      assert.equal(0, r.code)
      assert.is_string(r.data.sessionKey)
      local clear = decrypt(DEFAULT_SCHEME, priv, r.data.deviceSecret, r.data.sessionKey)
      assert.equal(admin_dev(dev.assetId).deviceSecret, clear)
      assert.matches("^%w+$", clear)
    end)

    it("encrypts per an app's scheme (OAEP-SHA256, AES-192-CBC, hex)", function()
      local _, r = replace({ assetId = dev.assetId }, { newDeviceKey = "new_key_04", requireSecret = true }, { app = APP_SHA })
      assert.equal(0, r.code)
      assert.matches("^%x+$", r.data.deviceSecret)
      assert.equal(admin_dev(dev.assetId).deviceSecret, decrypt(SHA256_SCHEME, priv, r.data.deviceSecret, r.data.sessionKey))
    end)

    it("V2.1 returns the new secret in clear", function()
      local _, r = h:call("POST", DEV21, { action = "replaceDevice", orgId = ORG, assetId = dev.assetId },
        { newDeviceKey = "new_key_05" })
      assert.equal(0, r.code)
      assert.is_nil(r.data.sessionKey)
      assert.equal(admin_dev(dev.assetId).deviceSecret, r.data.deviceSecret)
    end)

    it("applies exactly one of concurrent replaces of the same key", function()
      local cmds = {}
      for i = 1, 6 do
        local params = { action = "replaceDevice", orgId = ORG, productKey = "pk_demo", deviceKey = "old_key_01" }
        local body = cjson.encode { newDeviceKey = "race_key_" .. i }
        local tok, ts = h:token(), sim.now_ms()
        cmds[#cmds + 1] = string.format("curl -s -X POST -H 'apim-accesstoken: %s' -H 'apim-timestamp: %d' " ..
          "-H 'apim-signature: %s' -H 'Content-Type: application/json' --data-binary '%s' '%s%s?%s' &",
          tok, ts, sim.sign(tok, params, body, ts, "sk-main"), body, h.url, DEV, sim.query(params))
      end
      local p = io.popen("{ " .. table.concat(cmds, " ") .. " wait; } | sed 's/}{/}\\n{/g'")
      local out = p:read("*a")
      p:close()
      local wins, misses = 0, 0
      for line in out:gmatch("[^\n]+") do
        local r = cjson.decode(line)
        if r.code == 0 then wins = wins + 1 elseif r.code == 99400 then misses = misses + 1 end
      end
      assert.equal(1, wins)
      assert.equal(5, misses)
    end)
  end)

  describe("device login", function()
    it("accepts the current triple, marks the device online, refuses the old one after a replace", function()
      local dev = seed { productKey = "pk_demo", deviceKey = "login_old" }
      local st, r = h:login("pk_demo", "login_old", dev.deviceSecret)
      assert.equal(200, st)
      assert.same({ 0, "online" }, { r.code, r.data.status })
      local d = admin_dev(dev.assetId)
      assert.equal("online", d.status)
      assert.is_true(d.activeTime > 0)
      assert.is_true(d.lastOnlineTime > 0)
      st = h:login("pk_demo", "login_old", "WrongSecret")
      assert.equal(401, st)
      local _, rr = h:call("POST", DEV, { action = "replaceDevice", orgId = ORG, assetId = dev.assetId },
        { newDeviceKey = "login_new" })
      assert.equal(0, rr.code)
      local new_secret = admin_dev(dev.assetId).deviceSecret
      st = h:login("pk_demo", "login_old", dev.deviceSecret)
      assert.equal(401, st)
      st = h:login("pk_demo", "login_new", dev.deviceSecret)
      assert.equal(401, st)
      st, r = h:login("pk_demo", "login_new", new_secret)
      assert.equal(200, st)
      assert.equal(0, r.code)
    end)

    it("refuses a lowercase sign and blocks a device after more than 4 attempts in 2 minutes", function()
      local dev = seed { productKey = "pk_demo", deviceKey = "login_blk" }
      local ts = sim.now_ms()
      local lower = sim.sha256_hex("clientIdc1deviceKeylogin_blkproductKeypk_demotimestamp" .. ts .. dev.deviceSecret)
      assert.equal(401, (h:login("pk_demo", "login_blk", dev.deviceSecret, { clientId = "c1", timestamp = ts, sign = lower })))
      for _ = 2, 4 do assert.equal(200, (h:login("pk_demo", "login_blk", dev.deviceSecret))) end
      local st, r = h:login("pk_demo", "login_blk", dev.deviceSecret)
      assert.equal(429, st)
      assert.matches("blocked", r.msg)
    end)
  end)

  describe("create, get, search", function()
    it("creates a device (V2.4 without a secret unless requireSecret)", function()
      local st, r = h:call("POST", DEV, { action = "create", orgId = ORG }, {
        productKey = "pk_demo", deviceName = { defaultValue = "Meter 1" }, timezone = "+08:00", deviceKey = "created_01",
        deviceAttributes = { site = "A" } })
      assert.equal(200, st)
      assert.equal(0, r.code)
      assert.matches("^%w%w%w%w%w%w%w%w$", r.data.assetId)
      assert.equal("created_01", r.data.deviceKey)
      assert.is_nil(r.data.deviceSecret)
      local _, g = h:call("GET", DEV, { action = "get", orgId = ORG, productKey = "pk_demo", deviceKey = "created_01" })
      assert.equal(0, g.code)
      assert.equal("inactive", g.data.status)
      assert.equal("Meter 1", g.data.deviceName.defaultValue)
      assert.equal("Device", g.data.productType)
      assert.equal("Demo product", g.data.productName.defaultValue)
      assert.equal("A", g.data.deviceAttributes.site)
      assert.is_nil(g.data.deviceSecret)
      assert.is_number(g.data.createTime)
      local _, gs = h:call("GET", DEV, { action = "get", orgId = ORG, assetId = r.data.assetId, requireSecret = "true" })
      assert.equal(admin_dev(r.data.assetId).deviceSecret, decrypt(DEFAULT_SCHEME, priv, gs.data.deviceSecret, gs.data.sessionKey))
      local _, dup = h:call("POST", DEV, { action = "create", orgId = ORG }, {
        productKey = "pk_demo", deviceName = { defaultValue = "x" }, timezone = "+08:00", deviceKey = "created_01" })
      assert.equal(11702, dup.code)
      local _, bad = h:call("POST", DEV, { action = "create", orgId = ORG }, {
        productKey = "pk_demo", deviceName = { defaultValue = "x" } })
      assert.equal(99400, bad.code)
      assert.matches("timezone", bad.msg)
      local _, v21 = h:call("POST", DEV21, { action = "create", orgId = ORG }, {
        productKey = "pk_demo", deviceName = { defaultValue = "y" }, timezone = "+01:00" })
      assert.equal(0, v21.code)
      assert.equal(20, #v21.data.deviceSecret)
      local st405 = h:call("POST", DEV, { action = "get", orgId = ORG, assetId = r.data.assetId })
      assert.equal(405, st405)
    end)

    it("searches with =, in, and, and paginates", function()
      for i = 1, 5 do seed { productKey = "pk_demo", deviceKey = "search_" .. i, status = i <= 2 and "online" or "inactive" } end
      seed { productKey = "pk_gateway", deviceKey = "search_gw" }
      local _, r = h:call("POST", DEV, { action = "search", orgId = ORG }, {
        expression = "productKey = 'pk_demo' and status in ('inactive', 'online')", pagination = { pageNo = 2, pageSize = 2 } })
      assert.equal(0, r.code)
      assert.same({ pageNo = 2, pageSize = 2, totalSize = 5 }, r.pagination)
      assert.equal(2, #r.data)
      _, r = h:call("POST", DEV, { action = "search", orgId = ORG }, { expression = "status = 'online'" })
      assert.equal(2, r.pagination.totalSize)
      local st, _, raw = h:call("POST", DEV, { action = "search", orgId = ORG }, { expression = "deviceKey = 'none'" })
      assert.equal(200, st)
      assert.matches('"data":%[%]', raw)
      _, r = h:call("POST", DEV, { action = "search", orgId = ORG }, { pagination = { pageNo = 1, pageSize = 201 } })
      assert.equal(99400, r.code)
      _, r = h:call("POST", DEV, { action = "search", orgId = ORG }, { expression = "deviceKey == 'x'" })
      assert.equal(99400, r.code)
    end)
  end)

  describe("gateway topology", function()
    it("keeps a gateway's sub-devices across a replace", function()
      local gw = seed { productKey = "pk_gateway", deviceKey = "gw_old" }
      local s1 = seed { productKey = "pk_demo", deviceKey = "sub_1" }
      local s2 = seed { productKey = "pk_demo", deviceKey = "sub_2" }
      local _, r = h:call("POST", TOPO, { action = "addSubDevice", orgId = ORG }, {
        gateway = { assetId = gw.assetId }, subDevices = { { assetId = s1.assetId }, { productKey = "pk_demo", deviceKey = "sub_2" } } })
      assert.equal(0, r.code)
      _, r = h:call("POST", TOPO, { action = "addSubDevice", orgId = ORG }, {
        gateway = { assetId = s1.assetId }, subDevices = { { assetId = s2.assetId } } })
      assert.equal(99400, r.code)  -- not a gateway
      _, r = h:call("POST", DEV, { action = "replaceDevice", orgId = ORG, assetId = gw.assetId }, { newDeviceKey = "gw_new" })
      assert.equal(0, r.code)
      _, r = h:call("POST", TOPO, { action = "searchSubDevice", orgId = ORG }, {
        gateway = { productKey = "pk_gateway", deviceKey = "gw_new" } })
      assert.equal(0, r.code)
      assert.equal(2, r.pagination.totalSize)
      local keys = { r.data[1].deviceKey, r.data[2].deviceKey }
      table.sort(keys)
      assert.same({ "sub_1", "sub_2" }, keys)
      _, r = h:call("GET", TOPO, { action = "getGateway", orgId = ORG, assetId = s2.assetId })
      assert.equal(0, r.code)
      assert.equal("gw_new", r.data.deviceKey)
      _, r = h:call("GET", "/connect-service/v2.1/device-topos", { action = "getGateway", orgId = ORG, assetId = s1.assetId })
      assert.equal(gw.assetId, r.data.assetId)
    end)
  end)

  describe("fault injection", function()
    local dev
    before_each(function()
      h:token()
      dev = seed { productKey = "pk_demo", deviceKey = "fault_01" }
    end)
    after_each(function() h:admin("DELETE", "/faults") end)
    local function replace(key)
      return h:call("POST", DEV, { action = "replaceDevice", orgId = ORG, assetId = dev.assetId }, { newDeviceKey = key })
    end

    it("answers 429 with Retry-After for the next matching request only", function()
      local st = h:admin("POST", "/faults", { rate_limit = { status = 429, retry_after = 7, every = 1 }, match = "replaceDevice", count = 1 })
      assert.equal(200, st)
      assert.equal(200, (h:call("GET", DEV, { action = "get", orgId = ORG, assetId = dev.assetId })))  -- not matched
      local st1, r, _, hdr = replace("fault_02")
      assert.equal(429, st1)
      assert.equal("7", hdr["retry-after"])
      assert.equal("API rate limit exceeded", r.msg)
      assert.equal("fault_01", admin_dev(dev.assetId).deviceKey)
      local st2, r2 = replace("fault_02")
      assert.equal(200, st2)
      assert.equal(0, r2.code)
    end)

    it("rate limits every n-th request", function()
      h:admin("POST", "/faults", { rate_limit = { every = 2 }, match = "get" })
      local got = {}
      for i = 1, 4 do got[i] = (h:call("GET", DEV, { action = "get", orgId = ORG, assetId = dev.assetId })) end
      assert.same({ 200, 429, 200, 429 }, got)
    end)

    it("answers 500 and 503", function()
      h:admin("POST", "/faults", { error_share = 1, error_status = 503, count = 1 })
      assert.equal(503, (replace("fault_03")))
      h:admin("POST", "/faults", { error_share = 1, count = 1 })
      assert.equal(500, (replace("fault_03")))
      assert.equal(200, (replace("fault_03")))
    end)

    it("drops the connection without applying the call", function()
      h:admin("POST", "/faults", { drop_share = 1, count = 1 })
      local st, err = replace("fault_04")
      assert.is_nil(st)
      assert.matches("curl", err)
      assert.equal("fault_01", admin_dev(dev.assetId).deviceKey)
    end)

    it("ambiguous: applies the replace, then drops the connection", function()
      h:admin("POST", "/faults", { ambiguous_share = 1, match = "replaceDevice", count = 1 })
      local st, err = replace("fault_05")
      assert.is_nil(st)
      assert.matches("curl", err)
      assert.equal("fault_05", admin_dev(dev.assetId).deviceKey)
      local log = h:log()
      assert.equal(444, log[#log].status)
      assert.equal("ambiguous", log[#log].fault)
    end)

    it("truncates a body and sends non-JSON bodies", function()
      h:admin("POST", "/faults", { truncate_share = 1, count = 1 })
      local st, r = h:call("GET", DEV, { action = "get", orgId = ORG, assetId = dev.assetId })
      assert.is_true(st == nil or r == nil)
      h:admin("POST", "/faults", { nonjson_share = 1, count = 1 })
      local st2, r2, raw2 = h:call("GET", DEV, { action = "get", orgId = ORG, assetId = dev.assetId })
      assert.equal(200, st2)
      assert.is_nil(r2)
      assert.matches("<html>", raw2)
    end)

    it("adds latency", function()
      h:admin("POST", "/faults", { latency_ms = 400, count = 1 })
      local socket = require "socket"
      local t0 = socket.gettime()
      assert.equal(200, (h:call("GET", DEV, { action = "get", orgId = ORG, assetId = dev.assetId })))
      assert.is_true(socket.gettime() - t0 >= 0.4)
    end)

    it("expires tokens now", function()
      local _, r = h:admin("POST", "/faults", { expire_token_now = true })
      assert.is_true(r.data.expired_tokens >= 1)
      local st, b = h:call("GET", DEV, { action = "get", orgId = ORG, assetId = dev.assetId }, nil, { no_retry = true })
      assert.equal(401, st)
      assert.equal("token_expired", b.reason)
    end)
  end)

  describe("admin", function()
    it("logs requests with secrets redacted", function()
      local tok = h:token(nil, true)
      h:call("POST", DEV, { action = "create", orgId = ORG }, {
        productKey = "pk_demo", deviceName = { defaultValue = "L" }, timezone = "+08:00", deviceKey = "logged_01" })
      local entries = h:log()
      assert.is_true(#entries >= 2)
      local last = entries[#entries]
      assert.equal("POST", last.method)
      assert.equal(DEV, last.path)
      assert.equal("create", last.op)
      assert.equal(200, last.status)
      assert.equal(0, last.code)
      assert.equal("<redacted>", last.headers["apim-signature"])
      local _, raw = sim.http { url = h.admin_url .. "/log" }
      assert.is_nil(raw:find(tok, 1, true))
      assert.is_nil(raw:find("sk-main", 1, true))
      assert.is_truthy(raw:find('"encryption":"<redacted>"', 1, true))
    end)

    it("resets devices", function()
      seed { productKey = "pk_demo", deviceKey = "to_be_reset" }
      local _, r = h:admin("GET", "/devices")
      assert.equal(1, #r.data)
      h:admin("POST", "/reset")
      _, r = h:admin("GET", "/devices")
      assert.equal(0, #r.data)
    end)

    it("rejects unknown seed products", function()
      local st, r = h:admin("POST", "/devices", { productKey = "pk_nope" })
      assert.equal(400, st)
      assert.matches("does not exist", r.msg)
    end)
  end)
end)

describe("enos-sim over TLS with another scheme", function()
  local h
  local scheme = { rsa_padding = "oaep", aes_mode = "gcm", key_format = "base64", encoding = "base64url", key_bits = 256 }
  setup(function()
    h = sim.start { tls = true, config = { apps = { { access_key = "ak", secret_key = "sk", public_key = pub } },
      secret_scheme = scheme, token_status_typo = true } }
  end)
  teardown(function() if h then h:stop() end end)

  it("serves HTTPS with the generated CA and refuses clients without it", function()
    assert.matches("^https://127%.0%.0%.1:%d+$", h.url)
    assert.is_string(h.ca_file)
    local st = sim.http { url = h.admin_url .. "/health", ca_file = h.ca_file }
    assert.equal(200, st)
    local st2, err = sim.http { url = h.admin_url .. "/health" }
    assert.is_nil(st2)
    assert.matches("curl", err)
  end)

  it("can spell the token reply's status as the documented typo stauts", function()
    local st, r = h:token_request("get")
    assert.equal(200, st)
    assert.equal(0, r.stauts)
    assert.is_nil(r.status)
    assert.is_string(r.data.accessToken)
  end)

  it("encrypts with OAEP / AES-256-GCM / base64 key / base64url", function()
    local dev = h:seed { productKey = "pk_demo", deviceKey = "tls_dev" }
    local _, r = h:call("POST", DEV, { action = "replaceDevice", orgId = ORG, assetId = dev.assetId },
      { newDeviceKey = "tls_dev_new", requireSecret = true })
    assert.equal(0, r.code)
    assert.is_nil(r.data.deviceSecret:find("[=+/]"))
    assert.equal(h:device(dev.assetId).deviceSecret, decrypt(scheme, priv, r.data.deviceSecret, r.data.sessionKey))
  end)
end)

describe("enos-sim --state", function()
  it("keeps devices across a restart", function()
    local state = os.tmpname()
    os.remove(state)
    local h1 = sim.start { state_file = state }
    local ok, err = pcall(function()
      local _, r = h1:call("POST", DEV, { action = "create", orgId = ORG }, {
        productKey = "pk_demo", deviceName = { defaultValue = "P" }, timezone = "+08:00", deviceKey = "persist_01" })
      assert.equal(0, r.code)
      local _, rr = h1:call("POST", DEV, { action = "replaceDevice", orgId = ORG, assetId = r.data.assetId },
        { newDeviceKey = "persist_02" })
      assert.equal(0, rr.code)
      h1:stop()
      -- it holds every device's clear secret: private to its owner, whatever the umask
      local mode = require("enos.core").stat(state).mode
      assert.equal(0, mode % 64, ("state file mode %o"):format(mode))
      local h2 = sim.start { state_file = state }
      finally(function() h2:stop() end)
      local _, g = h2:call("GET", DEV, { action = "get", orgId = ORG, assetId = r.data.assetId })
      assert.equal(0, g.code)
      assert.equal("persist_02", g.data.deviceKey)
    end)
    h1:stop()
    os.remove(state)
    assert(ok, err)
  end)
end)
