-- The calls and checks the steps after a replace rely on: CSR and certificate parsing (enos.core), the client's
-- certificate, gateway and update calls (request bodies, serials kept exact), enos.aftercare's CSR rules.
local enos = require "enos"
local core = require "enos.core"
local aftercare = require "enos.aftercare"
local cjson = require "cjson"
local H = require "helpers"

local ORG = "o15724268424841"

describe("CSR and certificate checks", function()
  local dir
  local function make(name, newkey)
    local key, csr = dir .. "/" .. name .. ".key", dir .. "/" .. name .. ".csr"
    H.sh(("openssl req -new %s -nodes -keyout %s -out %s -subj /CN=%s 2>/dev/null"):format(newkey, key, csr, name))
    return H.readfile(csr), H.readfile(key), key, csr
  end
  setup(function() dir = H.tmpdir() end)

  it("reads an RSA and an EC CSR, and the certificate issued for one names the same key", function()
    local rsa, _, key, csr = make("rsa", "-newkey rsa:2048")
    local i = assert(core.csr_info(rsa))
    assert.equal("RSA", i.key)
    assert.equal(2048, i.bits)
    assert.equal("CN=rsa", i.subject)
    assert.matches("^%x+$", i.key_sha256)
    assert.equal(64, #i.key_sha256)
    H.sh(("openssl x509 -req -in %s -signkey %s -set_serial 123456789012345678901234567890 -days 1 -out %s/rsa.crt " ..
      "2>/dev/null"):format(csr, key, dir))
    local c = assert(core.cert_info(H.readfile(dir .. "/rsa.crt")))
    assert.equal("123456789012345678901234567890", c.serial)
    assert.equal(i.key_sha256, c.key_sha256)
    local ec = make("ec", "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1")
    local e = assert(core.csr_info(ec))
    assert.equal("EC", e.key)
    assert.equal("prime256v1", e.curve)
    assert.not_equal(i.key_sha256, e.key_sha256)
    assert.equal("RSA", (aftercare.check_csr(rsa)))
    assert.equal("ECC", (aftercare.check_csr(ec)))
  end)

  it("refuses what is not a usable CSR, naming why", function()
    local rsa, key = make("rsa2", "-newkey rsa:2048")
    -- a byte of the signature changed: it parses, but does not verify
    local body = rsa:match("%-%-%-%-%-BEGIN CERTIFICATE REQUEST%-%-%-%-%-\n(.-)%-%-%-%-%-END")
    local b64 = body:gsub("\n", "")
    local pos = #b64 - 10
    local ch = b64:sub(pos, pos) == "A" and "B" or "A"
    local bad = "-----BEGIN CERTIFICATE REQUEST-----\n" .. b64:sub(1, pos - 1) .. ch .. b64:sub(pos + 1) ..
      "\n-----END CERTIFICATE REQUEST-----\n"
    local ok, why = aftercare.check_csr(bad)
    assert.is_nil(ok)
    assert.matches("signature does not verify", why, 1, true)
    ok, why = aftercare.check_csr(key)
    assert.is_nil(ok)
    assert.matches("private key", why, 1, true)
    ok, why = aftercare.check_csr("hello")
    assert.is_nil(ok)
    assert.matches("not a PEM certificate signing request", why, 1, true)
    ok, why = aftercare.check_csr(make("small", "-newkey rsa:1024"))
    assert.is_nil(ok)
    assert.matches("1024 bits", why, 1, true)
    ok, why = aftercare.check_csr(make("p384", "-newkey ec -pkeyopt ec_paramgen_curve:secp384r1"))
    assert.is_nil(ok)
    assert.matches("P-256", why, 1, true)
    assert.is_nil((core.cert_info("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")))
  end)
end)

describe("client calls for the steps after a replace", function()
  local function client(handler)
    local stub = H.stub(handler or function() return H.envelope(nil) end)
    local c = assert(enos.client { endpoint = "https://gw.example.com", access_key = "ak-123456",
      secret_key = "super-secret-key-xyz", org_id = ORG, transport = stub })
    return c, stub
  end

  it("revoke sends the serial's digits exactly, with reason 4 by default; refuses a bad serial or reason", function()
    local c, stub = client()
    assert(c:revoke_certificate { assetId = "A1", certSn = "123456789012345678901234567890" })
    local req = stub:api_requests()[1]
    assert.equal('{"certSn":123456789012345678901234567890,"reason":4}', req.body)
    assert.matches("/connect%-service/v2%.0/certificates%?", req.url)
    assert.matches("action=revoke", req.url, 1, true)
    assert(c:revoke_certificate { assetId = "A1", certSn = 42, reason = 1 })
    assert.equal('{"certSn":42,"reason":1}', stub:api_requests()[2].body)
    local _, err = c:revoke_certificate { assetId = "A1", certSn = "12a" }
    assert.equal("certSn", err.field)
    _, err = c:revoke_certificate { assetId = "A1", certSn = "1", reason = 2 }
    assert.equal("reason", err.field)
    assert.equal(2, #stub:api_requests())
  end)

  it("list keeps a serial past 2^53 exact, under certSn whichever spelling the platform used", function()
    local c = client(function()
      return { status = 200, headers = {}, body = '{"code":0,"msg":"OK","data":[' ..
        '{"certSN":98765432109876543210,"certStatus":0,"cert":"x"},{"certSn":7,"certStatus":1}]}' }
    end)
    local list = assert(c:list_certificates { assetId = "A1" })
    assert.equal("98765432109876543210", list[1].certSn)
    assert.equal("7", list[2].certSn)
    assert.is_nil(list[1].certSN)
  end)

  it("apply checks the CSR and its options before sending", function()
    local c, stub = client()
    local _, err = c:apply_certificate { assetId = "A1", csr = "-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----" }
    assert.equal("csr", err.field)
    _, err = c:apply_certificate { assetId = "A1",
      csr = "-----BEGIN CERTIFICATE REQUEST-----\nx\n-----END CERTIFICATE REQUEST-----", issueAuthority = "DSA" }
    assert.equal("issueAuthority", err.field)
    _, err = c:apply_certificate { assetId = "A1",
      csr = "-----BEGIN CERTIFICATE REQUEST-----\nx\n-----END CERTIFICATE REQUEST-----", validDay = 0 }
    assert.equal("validDay", err.field)
    assert.equal(0, #stub:api_requests())
  end)

  it("update needs the device's name and time zone, and a map of string tags", function()
    local c, stub = client()
    local _, err = c:update_device { assetId = "A1", deviceTags = { a = "1" } }
    assert.equal("deviceName", err.field)
    _, err = c:update_device { assetId = "A1", deviceName = { defaultValue = "n" }, deviceTags = { a = "1" } }
    assert.equal("timezone", err.field)
    _, err = c:update_device { assetId = "A1", deviceName = { defaultValue = "n" }, timezone = "+08:00",
      deviceTags = { "x" } }
    assert.equal("deviceTags", err.field)
    _, err = c:update_device { assetId = "A1", deviceName = { defaultValue = "n" }, timezone = "+08:00",
      deviceTags = { a = 1 } }
    assert.equal("deviceTags", err.field)
    assert.equal(0, #stub:api_requests())
    assert(c:update_device { assetId = "A1", deviceName = { defaultValue = "n" }, timezone = "+08:00",
      deviceTags = { site = "North" } })
    local req = stub:api_requests()[1]
    assert.matches("/connect%-service/v2%.1/devices%?", req.url)
    assert.matches("action=update", req.url, 1, true)
    local body = cjson.decode(req.body)
    assert.equal("n", body.deviceName.defaultValue)
    assert.equal("+08:00", body.timezone)
    assert.equal("North", body.deviceTags.site)
  end)

  it("get_gateway: the gateway, or false when the device has none", function()
    local c = client(function(req)
      if req.url:find("assetId=SUB", 1, true) then
        return H.envelope { assetId = "GW1", productKey = "pk_gateway", deviceKey = "gw", status = "online" }
      end
      return H.envelope(nil)
    end)
    local g = assert(c:get_gateway { assetId = "SUB" })
    assert.equal("GW1", g.assetId)
    assert.is_false(c:get_gateway { assetId = "LONE" })
  end)
end)
