-- Secret decryption against an independent encryptor (openssl command + luaossl).
local enos = require "enos"
local H = require "helpers"

local SECRET = "Z5YtZaQpK5IWocakV7zQ"

describe("enos.load_private_key", function()
  local kp = H.keypair()
  it("loads PKCS#8 PEM text and a file, and never shows key material", function()
    local k = assert(enos.load_private_key(kp.private_pem))
    assert.equal("enos.key (RSA 2048-bit private key)", tostring(k))
    local k2 = assert(enos.load_private_key { file = kp.private_file })
    assert.equal(2048, k2:bits())
    assert.falsy(tostring(k2):find("BEGIN", 1, true))
  end)
  it("gives a config error for garbage, a public key and a missing file", function()
    local k, err = enos.load_private_key("not a key")
    assert.is_nil(k)
    assert.equal("config", err.kind)
    k, err = enos.load_private_key(H.readfile(kp.public_file))
    assert.is_nil(k)
    assert.equal("config", err.kind)
    k, err = enos.load_private_key { file = "/nonexistent/key.pem" }
    assert.is_nil(k)
    assert.equal("config", err.kind)
  end)
end)

describe("enos.decrypt_secret", function()
  local kp = H.keypair()
  local key = assert(enos.load_private_key(kp.private_pem))

  it("decrypts the default enos-v2.4 scheme (RSA PKCS#1 v1.5 + AES-128-ECB, base64)", function()
    local sk, ds = H.encrypt_secret(kp.public_file, SECRET)
    assert.equal(SECRET, enos.decrypt_secret { private_key = key, session_key = sk, secret = ds })
    assert.equal(SECRET, enos.decrypt_secret { private_key = kp.private_pem, session_key = sk, secret = ds,
      scheme = "enos-v2.4" })
  end)

  -- Every option of every part, each with a named scheme and with auto.
  local cases = {
    { rsa_padding = "oaep" }, { rsa_padding = "oaep-sha256" },
    { aes_mode = "cbc" }, { aes_mode = "gcm" },
    { key_format = "base64" }, { key_format = "hex" },
    { encoding = "base64url" }, { encoding = "hex" },
    { key_bits = 256 }, { key_bits = 192, aes_mode = "cbc" },
    { rsa_padding = "oaep-sha256", aes_mode = "gcm", key_format = "hex", encoding = "base64url" },
  }
  for _, scheme in ipairs(cases) do
    local parts = {}
    for k, v in pairs(scheme) do parts[#parts + 1] = k .. "=" .. v end
    table.sort(parts)
    local name = table.concat(parts, ",")
    it("decrypts " .. name .. " when named, and finds it with auto", function()
      local sk, ds = H.encrypt_secret(kp.public_file, SECRET, scheme)
      local named = {}
      for k, v in pairs(scheme) do if k ~= "key_bits" then named[k] = v end end
      assert.equal(SECRET, enos.decrypt_secret { private_key = key, session_key = sk, secret = ds, scheme = named })
      local pt, found = enos.decrypt_secret { private_key = key, session_key = sk, secret = ds, scheme = "auto" }
      assert.equal(SECRET, pt)
      for k, v in pairs(named) do assert.equal(v, found[k]) end
    end)
  end

  it("gives decrypt (never a garbage secret) for the wrong key", function()
    local other = H.keypair(1024)
    local sk, ds = H.encrypt_secret(other.public_file, SECRET)
    local pt, err = enos.decrypt_secret { private_key = key, session_key = sk, secret = ds }
    assert.is_nil(pt)
    assert.equal("decrypt", err.kind)
    pt, err = enos.decrypt_secret { private_key = key, session_key = sk, secret = ds, scheme = "auto" }
    assert.is_nil(pt)
    assert.equal("decrypt", err.kind)
  end)

  it("gives decrypt for a corrupted secret, session key, or wrong scheme", function()
    local sk, ds = H.encrypt_secret(kp.public_file, SECRET)
    local bad = { ds:sub(1, -5) .. "AAA=", "!!!", "", ds:sub(1, 10) }
    for _, b in ipairs(bad) do
      local pt, err = enos.decrypt_secret { private_key = key, session_key = sk, secret = b }
      assert.is_nil(pt)
      assert.equal("decrypt", err.kind)
    end
    local pt, err = enos.decrypt_secret { private_key = key, session_key = sk:sub(3), secret = ds }
    assert.is_nil(pt)
    assert.equal("decrypt", err.kind)
    pt, err = enos.decrypt_secret { private_key = key, session_key = sk, secret = ds, scheme = { aes_mode = "gcm" } }
    assert.is_nil(pt)
    assert.equal("decrypt", err.kind)
  end)

  it("names a bad scheme option", function()
    local pt, err = enos.decrypt_secret { private_key = key, session_key = "x", secret = "y",
      scheme = { aes_mode = "ctr" } }
    assert.is_nil(pt)
    assert.equal("scheme.aes_mode", err.field)
  end)

  it("never puts the plaintext or key into the error", function()
    local sk, ds = H.encrypt_secret(kp.public_file, SECRET, { aes_mode = "cbc" })
    local _, err = enos.decrypt_secret { private_key = key, session_key = sk, secret = ds }
    assert.falsy(tostring(err):find(SECRET, 1, true))
    assert.falsy(tostring(err):find("PRIVATE", 1, true))
  end)
end)
