-- The client against the real simulator (nginx) over HTTP and HTTPS.
local enos = require "enos"
local H = require "helpers"
local sim = dofile("spec/sim_helper.lua")

local SECRET_KEY = "app-secret-key-for-specs"

local function sim_config(kp, extra)
  local cfg = {
    apps = {
      { access_key = "ak-with-key", secret_key = SECRET_KEY, public_key_file = kp.public_file },
      { access_key = "ak-no-key", secret_key = SECRET_KEY },
      { access_key = "ak-other-org", secret_key = SECRET_KEY, orgs = { "o-other" } },
    },
    orgs = { "o15724268424841", "o-other" },
    devices = {
      { productKey = "pk_demo", deviceKey = "INV-0001", assetId = "Asset001", status = "online" },
      { productKey = "pk_demo", deviceKey = "INV-0002", assetId = "Asset002" },
      { productKey = "pk_demo", deviceKey = "INV-0003", assetId = "Asset003" },
    },
  }
  for k, v in pairs(extra or {}) do cfg[k] = v end
  return cfg
end

for _, tls in ipairs { false, true } do
  describe("client against enos-sim over " .. (tls and "HTTPS" or "HTTP"), function()
    local h, kp
    local function client(extra)
      local opts = { endpoint = h.url, access_key = "ak-with-key", secret_key = SECRET_KEY,
        org_id = "o15724268424841", private_key_file = kp.private_file, cafile = h.ca_file, timeout = 5 }
      for k, v in pairs(extra or {}) do opts[k] = v end
      return assert(enos.client(opts))
    end
    setup(function()
      kp = H.keypair()
      h = sim.start { tls = tls, config = sim_config(kp) }
    end)
    teardown(function() if h then h:stop() end end)
    before_each(function() h:admin("POST", "/reset") end)

    it("replaces by assetId with the secret decrypted (default scheme), and the new triple logs in", function()
      local c = client()
      local r = assert(c:replace_device { assetId = "Asset001", newDeviceKey = "INV-0001-B", requireSecret = true })
      assert.equal("Asset001", r.assetId)
      assert.equal("pk_demo", r.productKey)
      assert.equal("INV-0001-B", r.deviceKey)
      assert.is_nil(r.err)
      assert.matches("^[%w]+$", r.deviceSecret)
      local status, body = h:login("pk_demo", "INV-0001-B", r.deviceSecret)
      assert.equal(200, status, body and body.msg)
      local d = assert(c:get_device { assetId = "Asset001" })
      assert.equal("INV-0001-B", d.deviceKey)
      c:close()
    end)

    it("replaces by productKey+deviceKey; the device is inactive and the old key is gone", function()
      local c = client()
      local r = assert(c:replace_device { productKey = "pk_demo", deviceKey = "INV-0002", newDeviceKey = "INV-0002-B" })
      assert.equal("Asset002", r.assetId)
      assert.is_nil(r.deviceSecret)
      assert.is_nil(r.encrypted)
      local d = assert(c:get_device { productKey = "pk_demo", deviceKey = "INV-0002-B", requireSecret = true })
      assert.equal("inactive", d.status)
      assert.matches("^[%w]+$", d.deviceSecret)
      local gone, err = c:get_device { productKey = "pk_demo", deviceKey = "INV-0002" }
      assert.is_nil(gone)
      assert.equal("not_found", err.kind)
    end)

    it("get_device with requireSecret returns the secret the replace issued", function()
      local c = client()
      local r = assert(c:replace_device { assetId = "Asset003", newDeviceKey = "INV-0003-B", requireSecret = true })
      local d = assert(c:get_device { assetId = "Asset003", requireSecret = true })
      assert.equal(r.deviceSecret, d.deviceSecret)
    end)

    it("maps every replace error to its code and kind", function()
      local c = client()
      local _, e = c:replace_device { assetId = "Asset001", newDeviceKey = "INV-0002" }
      assert.equal("conflict", e.kind); assert.equal(11702, e.code); assert.is_string(e.request_id)
      _, e = c:replace_device { assetId = "Asset001", newDeviceKey = "INV-0001" }
      assert.equal("invalid_argument", e.kind); assert.equal(11704, e.code)
      _, e = c:replace_device { assetId = "NoSuchAsset", newDeviceKey = "INV-9999" }
      assert.equal("not_found", e.kind); assert.equal(99400, e.code)
      _, e = c:replace_device { assetId = "Asset001", newDeviceKey = "INV-9999", orgId = "o-unknown" }
      assert.equal("invalid_argument", e.kind); assert.equal(99400, e.code)
      local nokey = client { access_key = "ak-no-key" }
      _, e = nokey:replace_device { assetId = "Asset001", newDeviceKey = "INV-9999", requireSecret = true }
      assert.equal("config", e.kind); assert.equal(11858, e.code)
      local other = client { access_key = "ak-other-org" }
      _, e = other:replace_device { assetId = "Asset001", newDeviceKey = "INV-9999" }
      assert.equal("permission", e.kind); assert.equal(99403, e.code)
      -- nothing changed
      assert.equal("INV-0001", assert(c:get_device { assetId = "Asset001" }).deviceKey)
    end)

    it("a wrong secret key is auth and sends no API call", function()
      local c = client { secret_key = "wrong-secret" }
      local r, e = c:replace_device { assetId = "Asset001", newDeviceKey = "INV-9999" }
      assert.is_nil(r)
      assert.equal("auth", e.kind)
      assert.equal(1003, e.code)
      for _, entry in ipairs(h:log()) do assert.not_equal("replaceDevice", entry.op) end
    end)

    it("gets a new token when the token expires and retries transparently", function()
      local c = client()
      assert(c:get_device { assetId = "Asset001" })
      h:admin("POST", "/tokens/expire")
      local d = assert(c:get_device { assetId = "Asset002" })
      assert.equal("Asset002", d.assetId)
      local gets = 0
      for _, entry in ipairs(h:log()) do if entry.op == "token.get" then gets = gets + 1 end end
      assert.equal(2, gets)
    end)

    it("maps gateway faults: 429 with Retry-After, 503, drop, ambiguous, non-JSON, truncated, latency", function()
      local c = client { timeout = 1 }
      assert(c:get_device { assetId = "Asset001" })            -- token in hand
      local function fault(f) h:admin("POST", "/faults", f) end
      fault { rate_limit = { status = 429, retry_after = 3, every = 1 }, count = 1, match = "get" }
      local _, e = c:get_device { assetId = "Asset001" }
      assert.equal("rate_limited", e.kind); assert.equal(3, e.retry_after); assert.is_true(e.retryable)
      fault { error_share = 1, error_status = 503, count = 1, match = "get" }
      _, e = c:get_device { assetId = "Asset001" }
      assert.equal("server", e.kind); assert.equal(503, e.status); assert.is_true(e.retryable)
      fault { drop_share = 1, count = 1, match = "replaceDevice" }
      _, e = c:replace_device { assetId = "Asset002", newDeviceKey = "INV-0002-C" }
      assert.equal("transport", e.kind); assert.is_true(e.request_sent)
      assert.equal("INV-0002", assert(c:get_device { assetId = "Asset002" }).deviceKey)  -- dropped before handling
      -- an idempotent read on a kept-alive connection that dies is re-sent by libcurl and succeeds
      fault { drop_share = 1, count = 1, match = "get" }
      assert(c:get_device { assetId = "Asset001" })
      fault { ambiguous_share = 1, count = 1, match = "replaceDevice" }
      _, e = c:replace_device { assetId = "Asset003", newDeviceKey = "INV-0003-C" }
      assert.equal("transport", e.kind); assert.is_true(e.request_sent)
      assert.equal("INV-0003-C", assert(c:get_device { assetId = "Asset003" }).deviceKey)  -- it was applied
      fault { nonjson_share = 1, count = 1, match = "get" }
      _, e = c:get_device { assetId = "Asset001" }
      assert.equal("protocol", e.kind)
      fault { truncate_share = 1, count = 1, match = "get" }
      _, e = c:get_device { assetId = "Asset001" }
      assert.is_truthy(e.kind == "transport" or e.kind == "protocol", e.kind)
      fault { latency_ms = 1500, count = 1, match = "get" }
      _, e = c:get_device { assetId = "Asset001" }
      assert.equal("timeout", e.kind)
      h:admin("DELETE", "/faults")
    end)

    if tls then
      it("a CA that did not sign the server's certificate gives tls", function()
        local c = client { cafile = "/etc/ssl/certs/ca-certificates.crt" }
        local r, e = c:get_device { assetId = "Asset001" }
        assert.is_nil(r)
        assert.equal("tls", e.kind)
      end)
    end
  end)
end

describe("client against enos-sim with another secret scheme", function()
  local h, kp
  setup(function()
    kp = H.keypair()
    h = sim.start { config = sim_config(kp, {
      secret_scheme = { rsa_padding = "oaep-sha256", aes_mode = "gcm", key_format = "base64", encoding = "base64url" } }) }
  end)
  teardown(function() if h then h:stop() end end)

  it("the default scheme fails safely and keeps the encrypted pair; auto finds the scheme", function()
    local base = { endpoint = h.url, access_key = "ak-with-key", secret_key = SECRET_KEY, org_id = "o15724268424841",
      private_key_file = kp.private_file }
    local c = assert(enos.client(base))
    local r = assert(c:replace_device { assetId = "Asset001", newDeviceKey = "INV-0001-X", requireSecret = true })
    assert.is_nil(r.deviceSecret)
    assert.equal("decrypt", r.err.kind)
    local pt, scheme = enos.decrypt_secret { private_key = kp.private_pem, session_key = r.encrypted.sessionKey,
      secret = r.encrypted.deviceSecret, scheme = "auto" }
    assert.equal(200, (h:login("pk_demo", "INV-0001-X", pt)))
    assert.same({ rsa_padding = "oaep-sha256", aes_mode = "gcm", key_format = "base64", encoding = "base64url" }, scheme)
    base.secret_scheme = "auto"
    local auto = assert(enos.client(base))
    local r2 = assert(auto:replace_device { assetId = "Asset002", newDeviceKey = "INV-0002-X", requireSecret = true })
    assert.equal(200, (h:login("pk_demo", "INV-0002-X", r2.deviceSecret)))
  end)
end)
