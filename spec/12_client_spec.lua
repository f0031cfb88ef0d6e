-- The whole call path against a stub transport.
local enos = require "enos"
local cjson = require "cjson"
local H = require "helpers"

local SK = "super-secret-key-xyz"

local function client(stub, extra)
  local clock = H.clock()
  local opts = { endpoint = "https://gw.example.com", access_key = "ak-123456", secret_key = SK,
    org_id = "o15724268424841", transport = stub, clock = clock.fn }
  for k, v in pairs(extra or {}) do opts[k] = v end
  return assert(enos.client(opts)), clock
end

local function replace_ok(req)
  local q = require("enos.core").parse_query(req.url:match("%?(.*)$"))
  local body = cjson.decode(req.body)
  return H.envelope { assetId = q.assetId or "Nmw9npSq", productKey = q.productKey or "pk1", deviceKey = body.newDeviceKey }
end

describe("client token handling", function()
  it("fetches a token once and reuses it", function()
    local stub = H.stub(replace_ok)
    local c = client(stub)
    for i = 1, 3 do assert(c:replace_device { assetId = "Nmw9npSq", newDeviceKey = "new-key-" .. i }) end
    assert.equal(1, stub.token_requests)
    assert.equal(4, #stub.requests)
    for _, r in ipairs(stub:api_requests()) do assert.equal("tok-1", r.headers["apim-accesstoken"]) end
  end)

  it("sends the token request the protocol describes", function()
    local stub = H.stub(function() return H.envelope { assetId = "a1" } end)
    local c = client(stub)
    assert(c:get_device { assetId = "a1" })
    local tr = stub.requests[1]
    assert.equal("POST", tr.method)
    assert.equal("https://gw.example.com/apim-token-service/v2.0/token/get", tr.url)
    local body = cjson.decode(tr.body)
    assert.equal("ak-123456", body.appKey)
    assert.equal("number", type(body.timestamp))
    assert.equal(enos.token_encryption("ak-123456", body.timestamp, SK), body.encryption)
    assert.matches('"timestamp":%d+[,}]', tr.body)
  end)

  it("refreshes about 10 minutes before expiry, and gets a new one after expiry", function()
    local stub = H.stub(replace_ok)
    local c, clock = client(stub)
    assert(c:replace_device { assetId = "a1", newDeviceKey = "key-0001" })
    clock.advance((7200 - 700) * 1000)                    -- 11m40s left: still fine
    assert(c:replace_device { assetId = "a1", newDeviceKey = "key-0002" })
    assert.equal(1, stub.token_requests)
    clock.advance(200 * 1000)                             -- 8m20s left: refresh
    assert(c:replace_device { assetId = "a1", newDeviceKey = "key-0003" })
    assert.equal(2, stub.token_requests)
    local refresh = stub.requests[#stub.requests - 1]
    assert.matches("/token/refresh$", refresh.url)
    assert.equal("tok-1", cjson.decode(refresh.body).accessToken)
    clock.advance(7300 * 1000)                            -- expired: get, not refresh
    assert(c:replace_device { assetId = "a1", newDeviceKey = "key-0004" })
    assert.matches("/token/get$", stub.requests[#stub.requests - 1].url)
  end)

  it("never sends two token requests with the same timestamp", function()
    local stub = H.stub(replace_ok)
    local c = client(stub)          -- the clock does not move at all
    for i = 1, 3 do
      c:reset_token()
      assert(c:replace_device { assetId = "a1", newDeviceKey = "key-000" .. i })
    end
    local seen = {}
    for _, r in ipairs(stub.requests) do
      if r.url:find("token") then
        local ts = cjson.decode(r.body).timestamp
        assert.is_nil(seen[ts])
        seen[ts] = true
      end
    end
    assert.equal(3, stub.token_requests)
  end)

  it("on 1203 gets a new token and retries once; a shared token_cache drops only the rejected one", function()
    local n = 0
    local stub = H.stub(function(req)
      n = n + 1
      if n == 1 then return H.envelope(nil, 1203, "access token expired") end
      return replace_ok(req)
    end)
    local calls = {}
    local cache = {
      get = function() return nil end,
      set = function(_, _, tok, rejected) calls[#calls + 1] = { tok and tok.value or "nil", rejected or "none" } end,
    }
    local c = client(stub, { token_cache = cache })
    local r = assert(c:replace_device { assetId = "a1", newDeviceKey = "key-0001" })
    assert.equal("key-0001", r.deviceKey)
    assert.equal(2, stub.token_requests)
    assert.equal("tok-2", stub:api_requests()[2].headers["apim-accesstoken"])
    -- stored tok-1; dropped tok-1 (only if the cache still holds it: another worker may have stored a newer
    -- one); stored tok-2
    assert.same({ { "tok-1", "none" }, { "nil", "tok-1" }, { "tok-2", "none" } }, calls)
  end)

  it("on a 401 that says the token is invalid gets a new token and retries once; twice is auth", function()
    local stub = H.stub(function()
      return { status = 401, headers = {}, body = '{"status":401,"msg":"access token invalid or expired"}' }
    end)
    local c = client(stub)
    local r, err = c:replace_device { assetId = "a1", newDeviceKey = "key-0001" }
    assert.is_nil(r)
    assert.equal("auth", err.kind)
    assert.equal(2, #stub:api_requests())
    assert.equal(2, stub.token_requests)
  end)

  it("any 401 gets one fresh token and one re-send (the gateway refused it first); a second 401 is auth", function()
    local stub = H.stub(function()
      return { status = 401, headers = {}, body = '{"status":401,"msg":"signature mismatch"}' }
    end)
    local c = client(stub)
    local _, err = c:replace_device { assetId = "a1", newDeviceKey = "key-0001" }
    assert.equal("auth", err.kind)
    assert.equal(401, err.status)
    assert.matches("signature mismatch", err.message, 1, true)
    assert.equal(2, #stub:api_requests())
    assert.equal(2, stub.token_requests)
  end)

  it("a 1001 (an earlier request's encryption was taken, its reply lost) gets one new request, new timestamp",
    function()
    local n = 0
    local stub = H.stub(function() return H.envelope { assetId = "a1" } end, { token_handler = function()
      n = n + 1
      if n == 1 then
        return { status = 200, headers = {}, body = cjson.encode { status = 1001, msg = "repeated request" } }
      end
      return { status = 200, headers = {}, body = cjson.encode { status = 0, data = { accessToken = "tok-2", expire = 7200 } } }
    end })
    local c = client(stub)
    assert(c:get_device { assetId = "a1" })
    assert.equal(2, n)
    local t1, t2 = cjson.decode(stub.requests[1].body), cjson.decode(stub.requests[2].body)
    assert.not_equal(t1.timestamp, t2.timestamp)
    assert.not_equal(t1.encryption, t2.encryption)
    assert.is_true(stub.requests[1].once)         -- never re-sent as is by the transport
    -- a second 1001 is an error (kind auth, code 1001)
    n = 0
    local stub2 = H.stub(nil, { token_handler = function()
      n = n + 1
      return { status = 200, headers = {}, body = cjson.encode { status = 1001, msg = "repeated request" } }
    end })
    local _, err = client(stub2):get_device { assetId = "a1" }
    assert.equal(2, n)
    assert.equal("auth", err.kind)
    assert.equal(1001, err.code)
  end)

  it("maps token-service failures to auth/config with the status code", function()
    for code, kind in pairs { [1002] = "config", [1003] = "auth", [1004] = "config", [1005] = "server" } do
      local stub = H.stub(nil, { token_handler = function()
        return { status = 200, headers = {}, body = cjson.encode { stauts = code, msg = "nope" } }
      end })
      local c = client(stub)
      local r, err = c:replace_device { assetId = "a1", newDeviceKey = "key-0001" }
      assert.is_nil(r)
      assert.equal(kind, err.kind)
      assert.equal(code, err.code)
      assert.equal(0, #stub:api_requests())
    end
  end)
end)

describe("client error mapping", function()
  local function fails_with(res, terr)
    local stub = H.stub(function() return res, terr end)
    local c = client(stub)
    local r, err = c:replace_device { assetId = "a1", newDeviceKey = "key-0001" }
    assert.is_nil(r)
    return err
  end
  local codes = {
    { 11702, "DeviceKey existed", "conflict", false },
    { 11704, "DeviceKey is repetitive", "invalid_argument", false },
    { 99400, "Invalid arguments", "invalid_argument", false },
    { 99400, "Invalid arguments: device does not exist", "not_found", false },
    { 99403, "no permission", "permission", false },
    { 99404, "not found", "not_found", false },
    { 11858, "Unable to find public key", "config", false },
    { 99500, "internal error", "server", true },
  }
  for _, c in ipairs(codes) do
    it(("maps code %d (%s) to %s"):format(c[1], c[2], c[3]), function()
      local err = fails_with(H.envelope(nil, c[1], c[2]))
      assert.equal(c[3], err.kind)
      assert.equal(c[1], err.code)
      assert.equal("req-1234", err.request_id)
      assert.equal(c[4], err.retryable)
      assert.matches(tostring(c[1]), tostring(err))
    end)
  end
  it("says what 11858 means", function()
    assert.matches("no RSA key pair is registered", fails_with(H.envelope(nil, 11858, "Unable to find public key")).message)
  end)
  it("formats like 'enos: conflict 11702 DeviceKey existed (request …)'", function()
    assert.equal("enos: conflict 11702 DeviceKey existed (request req-1234)",
      tostring(fails_with(H.envelope(nil, 11702, "DeviceKey existed"))))
  end)
  local statuses = {
    { 401, "auth", false }, { 403, "permission", false }, { 400, "invalid_argument", false },
    { 429, "rate_limited", true }, { 500, "server", true }, { 503, "server", true }, { 502, "server", true },
  }
  for _, s in ipairs(statuses) do
    it(("maps HTTP %d to %s"):format(s[1], s[2]), function()
      local err = fails_with { status = s[1], headers = {}, body = "gateway says no" }
      assert.equal(s[2], err.kind)
      assert.equal(s[1], err.status)
      assert.equal(s[3], err.retryable)
      assert.equal("gateway says no", err.message)
    end)
  end
  it("carries Retry-After on 429", function()
    local err = fails_with { status = 429, headers = { ["retry-after"] = "7" }, body = "API rate limit exceeded" }
    assert.equal(7, err.retry_after)
    assert.matches("retry after 7", tostring(err))
  end)
  it("a 2xx body that is not the envelope is protocol", function()
    assert.equal("protocol", fails_with({ status = 200, headers = {}, body = "<html>" }).kind)
    assert.equal("protocol", fails_with({ status = 200, headers = {}, body = '{"ok":true}' }).kind)
    assert.equal("protocol", fails_with({ status = 200, headers = {}, body = '{"code":0,"data":null}' }).kind)
  end)
  it("passes transport failures through with their kind", function()
    for _, k in ipairs { "timeout", "tls", "transport" } do
      local err = fails_with(nil, { kind = k, message = "boom", request_sent = true })
      assert.equal(k, err.kind)
      assert.is_true(err.request_sent)
    end
  end)
  it("never echoes the token or secret key in an error", function()
    local err = fails_with { status = 500, headers = {}, body = "bad token tok-1 and " .. SK }
    assert.falsy(tostring(err):find("tok-1", 1, true))
    assert.falsy(tostring(err):find(SK, 1, true))
  end)
end)

describe("client validation sends nothing", function()
  local bad = {
    { {}, "assetId" },
    { { assetId = "a1" }, "newDeviceKey" },
    { { assetId = "a1", newDeviceKey = "abc" }, "newDeviceKey" },
    { { assetId = "a1", newDeviceKey = string.rep("a", 65) }, "newDeviceKey" },
    { { assetId = "a1", newDeviceKey = "has space" }, "newDeviceKey" },
    { { assetId = "a1", newDeviceKey = "ключ-1" }, "newDeviceKey" },
    { { assetId = "a1", productKey = "p", deviceKey = "d", newDeviceKey = "key-0001" }, "assetId" },
    { { productKey = "p", newDeviceKey = "key-0001" }, "deviceKey" },
    { { deviceKey = "d", newDeviceKey = "key-0001" }, "productKey" },
    { { productKey = "p", deviceKey = "same-key", newDeviceKey = "same-key" }, "newDeviceKey" },
    { { assetId = 42, newDeviceKey = "key-0001" }, "assetId" },
    { { assetId = "a\n1", newDeviceKey = "key-0001" }, "assetId" },
    { { assetId = "a1", newDeviceKey = "key-0001", requireSecret = "yes" }, "requireSecret" },
    { { assetId = "a1", newDeviceKey = "key-0001", newdevicekey = "x" }, "newdevicekey" },
    { { assetId = "a1", newDeviceKey = "key-0001", orgId = "" }, "orgId" },
  }
  for i, case in ipairs(bad) do
    it(("rejects bad input #%d naming %s"):format(i, case[2]), function()
      local stub = H.stub(replace_ok)
      local c = client(stub)
      local r, err = c:replace_device(case[1])
      assert.is_nil(r)
      assert.equal("invalid_argument", err.kind)
      assert.equal(case[2], err.field)
      assert.equal(0, #stub.requests)
    end)
  end
  it("needs an org id from the client or the call", function()
    local stub = H.stub(replace_ok)
    local c = assert(enos.client { endpoint = "https://gw.example.com", access_key = "ak", secret_key = "sk",
      transport = stub })
    local _, err = c:replace_device { assetId = "a1", newDeviceKey = "key-0001" }
    assert.equal("orgId", err.field)
    assert.equal(0, #stub.requests)
  end)
  it("raises on misuse (not a table)", function()
    local c = client(H.stub(replace_ok))
    assert.has_error(function() c:replace_device("a1") end)
  end)
end)

describe("client options", function()
  it("refuses plain http except to loopback, unless allowed", function()
    local c, err = enos.client { endpoint = "http://gw.example.com" }
    assert.is_nil(c)
    assert.equal("config", err.kind)
    assert.truthy(enos.client { endpoint = "http://127.0.0.1:8080" })
    assert.truthy(enos.client { endpoint = "http://localhost:8080" })
    assert.truthy(enos.client { endpoint = "http://gw.example.com", allow_insecure_http = true })
  end)
  it("names a bad option", function()
    local cases = {
      { { endpoint = "ftp://x" }, "endpoint" }, { {}, "endpoint" },
      { { endpoint = "https://x", timeout = "30" }, "timeout" },
      { { endpoint = "https://x", timeout = -1 }, "timeout" },
      { { endpoint = "https://x", api_version = "v3" }, "api_version" },
      { { endpoint = "https://x", acces_key = "typo" }, "acces_key" },
      { { endpoint = "https://x", private_key = "garbage" }, "private_key" },
      { { endpoint = "https://x", private_key_file = "/nonexistent.pem" }, "private_key_file" },
      { { endpoint = "https://x", secret_scheme = "rot13" }, "secret_scheme" },
    }
    for _, case in ipairs(cases) do
      local c, err = enos.client(case[1])
      assert.is_nil(c)
      assert.equal("config", err.kind)
      assert.equal(case[2], err.field)
    end
  end)
  it("tostring shows no secret", function()
    local kp = H.keypair()
    local c = client(H.stub(replace_ok), { private_key = kp.private_pem })
    local s = tostring(c)
    assert.falsy(s:find(SK, 1, true))
    assert.falsy(s:find("ak-123456", 1, true))
    assert.falsy(s:find("PRIVATE", 1, true))
    assert.matches("gw.example.com", s)
  end)
  it("warns when the private key file is readable by others, and when TLS verification is off", function()
    local kp = H.keypair()
    local dir = H.tmpdir()
    local open_key = dir .. "/open.pem"
    H.writefile(open_key, kp.private_pem, "644")
    local warnings = {}
    local function warn(m) warnings[#warnings + 1] = m end
    assert(enos.client { endpoint = "https://x.example.com", private_key_file = open_key, warn = warn })
    assert.equal(1, #warnings)
    assert.matches("readable by group or others %(mode 644%)", warnings[1])
    H.sh("chmod 600 " .. open_key)
    assert(enos.client { endpoint = "https://x.example.com", private_key_file = open_key, warn = warn })
    assert.equal(1, #warnings)
    assert(enos.client { endpoint = "https://x.example.com", verify_tls = false, warn = warn })
    assert.matches("TLS certificate verification is OFF", warnings[2])
    H.sh("rm -rf " .. dir)
  end)

  it("close is idempotent", function()
    local c = client(H.stub(replace_ok))
    c:close()
    c:close()
    local r, err = c:replace_device { assetId = "a1", newDeviceKey = "key-0001" }
    assert.is_nil(r)
    assert.equal("config", err.kind)
  end)
end)

describe("replace_device and get_device results", function()
  local kp = H.keypair()
  local SECRET = "Z5YtZaQpK5IWocakV7zQ"

  local function with_secret(scheme)
    return function(req)
      local body = req.body and cjson.decode(req.body) or {}
      local sk, ds = H.encrypt_secret(kp.public_file, SECRET, scheme)
      local wants = body.requireSecret or req.url:find("requireSecret=true", 1, true)
      return H.envelope { assetId = "Nmw9npSq", productKey = "pk1", deviceKey = body.newDeviceKey or "INV-1",
        deviceSecret = wants and ds or nil, sessionKey = wants and sk or nil, status = "inactive" }
    end
  end

  it("decrypts the new secret with a private key", function()
    local stub = H.stub(with_secret())
    local c = client(stub, { private_key_file = kp.private_file })
    local r = assert(c:replace_device { assetId = "Nmw9npSq", newDeviceKey = "INV-2231-B", requireSecret = true })
    assert.equal("Nmw9npSq", r.assetId)
    assert.equal("INV-2231-B", r.deviceKey)
    assert.equal(SECRET, r.deviceSecret)
    assert.equal("req-1234", r.requestId)
    assert.is_string(r.encrypted.sessionKey)
    assert.is_nil(r.err)
    assert.falsy(tostring(r):find(SECRET, 1, true))
    local req = stub:api_requests()[1]
    assert.equal('{"newDeviceKey":"INV-2231-B","requireSecret":true}', req.body)
    assert.equal("application/json;charset=UTF-8", req.headers["Content-Type"])
    assert.matches("^https://gw.example.com/connect%-service/v2.4/devices%?", req.url)
    assert.is_true(req.once)     -- a replace is never silently re-sent by the transport
    assert.matches("action=replaceDevice", req.url)
  end)

  it("without a key returns only the encrypted pair", function()
    local c = client(H.stub(with_secret()))
    local r = assert(c:replace_device { assetId = "Nmw9npSq", newDeviceKey = "INV-2231-B", requireSecret = true })
    assert.is_nil(r.deviceSecret)
    assert.is_string(r.encrypted.deviceSecret)
    local pt = enos.decrypt_secret { private_key = kp.private_pem, session_key = r.encrypted.sessionKey,
      secret = r.encrypted.deviceSecret }
    assert.equal(SECRET, pt)
  end)

  it("when decryption fails keeps the encrypted pair and explains (nothing lost)", function()
    local c = client(H.stub(with_secret { aes_mode = "gcm" }), { private_key_file = kp.private_file })
    local r = assert(c:replace_device { assetId = "Nmw9npSq", newDeviceKey = "INV-2231-B", requireSecret = true })
    assert.is_nil(r.deviceSecret)
    assert.equal("decrypt", r.err.kind)
    assert.equal(SECRET, enos.decrypt_secret { private_key = kp.private_pem, scheme = "auto",
      session_key = r.encrypted.sessionKey, secret = r.encrypted.deviceSecret })
  end)

  it("decrypts with the client's secret_scheme, including auto", function()
    local c = client(H.stub(with_secret { aes_mode = "gcm" }), { private_key_file = kp.private_file, secret_scheme = "auto" })
    local r = assert(c:replace_device { assetId = "Nmw9npSq", newDeviceKey = "INV-2231-B", requireSecret = true })
    assert.equal(SECRET, r.deviceSecret)
  end)

  it("get_device sends requireSecret as a query parameter and decrypts", function()
    local stub = H.stub(with_secret())
    local c = client(stub, { private_key_file = kp.private_file })
    local d = assert(c:get_device { productKey = "pk1", deviceKey = "INV-1", requireSecret = true })
    assert.equal(SECRET, d.deviceSecret)
    assert.equal("inactive", d.status)
    local req = stub:api_requests()[1]
    assert.equal("GET", req.method)
    assert.is_nil(req.body)
    assert.matches("requireSecret=true", req.url)
    assert.matches("action=get", req.url)
  end)

  it("v2.1 sends no requireSecret and reads the clear secret", function()
    local stub = H.stub(function(req)
      return H.envelope { assetId = "A", productKey = "pk1", deviceKey = cjson.decode(req.body).newDeviceKey,
        deviceSecret = SECRET }
    end)
    local c = client(stub, { api_version = "v2.1" })
    local r = assert(c:replace_device { assetId = "A", newDeviceKey = "key-0001", requireSecret = true })
    assert.equal(SECRET, r.deviceSecret)
    local req = stub:api_requests()[1]
    assert.equal('{"newDeviceKey":"key-0001"}', req.body)
    assert.matches("/connect%-service/v2.1/devices", req.url)
  end)
end)

describe("prepare, request and the one-shot API", function()
  it("prepare returns a signed request whose tostring redacts the token", function()
    local stub = H.stub(replace_ok)
    local c = client(stub)
    local req = assert(c:prepare("replace_device", { assetId = "Nmw9npSq", newDeviceKey = "dev_new_01", requireSecret = true }))
    assert.equal("POST", req.method)
    assert.equal(0, #stub:api_requests())
    local expect = enos.signature { access_token = "tok-1", app_secret = SK, timestamp = req.headers["apim-timestamp"],
      query = { action = "replaceDevice", orgId = "o15724268424841", assetId = "Nmw9npSq" }, body = req.body }
    assert.equal(expect, req.headers["apim-signature"])
    local dump = tostring(req)
    assert.falsy(dump:find("tok-1", 1, true))
    assert.falsy(dump:find(SK, 1, true))
    assert.matches("apim%-accesstoken: <redacted>", dump)
  end)

  it("request signs any other call and returns data and envelope", function()
    local stub = H.stub(function() return H.envelope({ { assetId = "x" } }, 0, "OK", { pagination = { totalSize = 1 } }) end)
    local c = client(stub)
    local data, env = c:request { method = "POST", path = "/connect-service/v2.4/devices",
      query = { action = "search" }, body = { expression = "status = 'online'" } }
    assert.equal("x", data[1].assetId)
    assert.equal(1, env.pagination.totalSize)
    assert.matches("orgId=o15724268424841", stub:api_requests()[1].url)
  end)

  it("search_devices builds the body with pagination", function()
    local stub = H.stub(function() return H.envelope({}, 0, "OK", { pagination = { pageNo = 2, pageSize = 50, totalSize = 0 } }) end)
    local c = client(stub)
    local list, pg = c:search_devices { expression = "deviceKey = 'a'", pageNo = 2, pageSize = 50 }
    assert.same({}, list)
    assert.equal(2, pg.pageNo)
    assert.same({ expression = "deviceKey = 'a'", pagination = { pageNo = 2, pageSize = 50 } },
      cjson.decode(stub:api_requests()[1].body))
  end)

  it("search_devices sends requireSecret and a projection in the body, and checks them", function()
    local stub = H.stub(function() return H.envelope({}, 0, "OK", { pagination = { pageNo = 1, pageSize = 10, totalSize = 0 } }) end)
    local c = client(stub)
    assert(c:search_devices { expression = "assetId in ('a','b')", requireSecret = true,
      projection = { "assetId", "deviceKey" } })
    assert.same({ expression = "assetId in ('a','b')", requireSecret = true, projection = { "assetId", "deviceKey" },
      pagination = { pageNo = 1, pageSize = 100 } }, cjson.decode(stub:api_requests()[1].body))
    for _, bad in ipairs { {}, { 1 }, { "a b" }, "assetId" } do
      local r, err = c:search_devices { projection = bad }
      assert.is_nil(r)
      assert.equal("projection", err.field)
    end
    local r, err = c:search_devices { requireSecret = "yes" }
    assert.is_nil(r)
    assert.equal("requireSecret", err.field)
  end)

  it("enos.replace_device takes client options and call parameters in one table", function()
    local stub = H.stub(replace_ok)
    local r = assert(enos.replace_device { endpoint = "https://gw.example.com", access_key = "ak", secret_key = "sk",
      org_id = "o1", transport = stub, productKey = "pk1", deviceKey = "old-sn", newDeviceKey = "new-sn" })
    assert.equal("new-sn", r.deviceKey)
    assert.matches("productKey=pk1", stub:api_requests()[1].url)
  end)

  it("the one-shot replace asks for the secret when a private key is configured, and says when it has none", function()
    local base = { endpoint = "https://gw.example.com", access_key = "ak", secret_key = "sk", org_id = "o1",
      productKey = "pk1", deviceKey = "old-sn", newDeviceKey = "new-sn" }
    local function with(extra)
      local t = {}
      for k, v in pairs(base) do t[k] = v end
      for k, v in pairs(extra) do t[k] = v end
      return t
    end
    local stub = H.stub(replace_ok)
    local r = assert(enos.replace_device(with { transport = stub }))
    assert.is_nil(stub:api_requests()[1].body:find("requireSecret", 1, true))
    assert.matches("not fetched", r.note, 1, true)
    local kp = H.keypair()
    local sk, ds = H.encrypt_secret(kp.public_file, "the-new-secret-123")
    stub = H.stub(function()
      return H.envelope { assetId = "Nmw9npSq", productKey = "pk1", deviceKey = "new-sn", deviceSecret = ds,
        sessionKey = sk }
    end)
    r = assert(enos.replace_device(with { transport = stub, private_key_file = kp.private_file }))
    assert.truthy(stub:api_requests()[1].body:find('"requireSecret":true', 1, true))
    assert.equal("the-new-secret-123", r.deviceSecret)
    assert.is_nil(r.note)
    stub = H.stub(function()
      return H.envelope { assetId = "Nmw9npSq", productKey = "pk1", deviceKey = "new-sn", deviceSecret = ds,
        sessionKey = "bm90IGEga2V5" }
    end)
    r = assert(enos.replace_device(with { transport = stub, private_key_file = kp.private_file }))
    assert.matches("could not be decrypted", r.note, 1, true)
    stub = H.stub(replace_ok)
    r = assert(enos.replace_device(with { transport = stub, private_key_file = kp.private_file, requireSecret = false }))
    assert.is_nil(stub:api_requests()[1].body:find("requireSecret", 1, true))
    assert.matches("not fetched", r.note, 1, true)
  end)

  it("the one-shot API resolves options as the CLI does: given > environment > profile file > defaults", function()
    local profile = require "enos.profile"
    local dir = H.tmpdir()
    H.writefile(dir .. "/config", "[default]\nendpoint = https://profile.example.com\naccess_key = pak\n" ..
      "secret_key = psk\norg_id = oprofile\ntimeout = 7\n", "600")
    local env = { ENOS_ENDPOINT = "https://e.example.com", ENOS_ORG_ID = "o9", ENOS_CONFIG = dir .. "/config",
      ENOS_TIMEOUT = "12", ENOS_API_VERSION = "v2.1" }
    local o = assert(profile.client_options({ org_id = "explicit" }, function(k) return env[k] end))
    assert.equal("https://e.example.com", o.endpoint)          -- environment over the profile
    assert.equal("explicit", o.org_id)                          -- given over the environment
    assert.equal("pak", o.access_key)                           -- the profile fills what is left
    assert.equal(12, o.timeout)                                 -- ENOS_TIMEOUT and ENOS_API_VERSION count here too
    assert.equal("v2.1", o.api_version)
    env.ENOS_TIMEOUT = "soon"
    local bad, err = profile.client_options({}, function(k) return env[k] end)
    assert.is_nil(bad)
    assert.equal("config", err.kind)
    assert.matches("timeout must be a positive number", err.message, 1, true)
    -- and through enos.replace_device: a bad setting is refused before any request
    local stub = H.stub(replace_ok)
    local saved = os.getenv
    os.getenv = function(k) return env[k] end          -- luacheck: ignore 122
    local r, e2 = enos.replace_device { transport = stub, productKey = "pk1", deviceKey = "old-sn", newDeviceKey = "new-sn" }
    os.getenv = saved                                  -- luacheck: ignore 122
    assert.is_nil(r)
    assert.matches("ENOS_TIMEOUT", e2.message, 1, true)
    assert.equal(0, #stub:api_requests())
  end)

  it("versions names enos, Lua, libcurl and OpenSSL", function()
    local v = enos.versions()
    assert.equal(enos._VERSION, v.enos)
    assert.equal(require("enos.core")._VERSION, enos._VERSION)
    assert.matches("^%d+%.%d+%.%d+$", enos._VERSION)
    assert.is_string(v.lua)
    assert.matches("^%d", v.libcurl)
    assert.matches("OpenSSL", v.openssl)
  end)
end)
