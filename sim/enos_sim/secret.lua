-- V2.4 requireSecret envelope: deviceSecret = encode(AES(K, secret)), sessionKey = encode(RSA(pub, K)).
-- Every part is an option (docs/protocol.md, encrypted secrets); "enos-v2.4" = pkcs1 / ecb / raw / base64 / 128 bits.
-- Implemented with luaossl, plus LuaJIT FFI into libcrypto for OAEP-SHA256 (luaossl cannot set the OAEP digest).
local pkey = require "openssl.pkey"
local cipher = require "openssl.cipher"
local rand = require "openssl.rand"
local util = require "enos_sim.util"

local M = {}

M.PRESETS = {
  ["enos-v2.4"] = { rsa_padding = "pkcs1", aes_mode = "ecb", key_format = "raw", encoding = "base64", key_bits = 128 },
}

local VALID = {
  rsa_padding = { pkcs1 = true, oaep = true, ["oaep-sha256"] = true },
  aes_mode = { ecb = true, cbc = true, gcm = true },
  key_format = { raw = true, base64 = true, hex = true },
  encoding = { base64 = true, base64url = true, hex = true },
  key_bits = { [128] = true, [192] = true, [256] = true },
}

--- Normalise a scheme (preset name or option table) into a full option table; nil, err if invalid.
function M.scheme(s)
  if s == nil then s = "enos-v2.4" end
  if type(s) == "string" then
    local p = M.PRESETS[s]
    if not p then return nil, "unknown secret_scheme " .. s end
    return p
  end
  if type(s) ~= "table" then return nil, "secret_scheme must be a name or a table" end
  local base = M.PRESETS["enos-v2.4"]
  local r = {}
  for k, valid in pairs(VALID) do
    local v = s[k]
    if v == nil then v = base[k] end
    if k == "key_bits" then v = tonumber(v) end
    if not valid[v] then return nil, "invalid secret_scheme." .. k .. ": " .. tostring(v) end
    r[k] = v
  end
  return r
end

local function b64url(s)
  return (ngx.encode_base64(s):gsub("%+", "-"):gsub("/", "_"):gsub("=+$", ""))
end

local function encode(s, how)
  if how == "base64" then return ngx.encode_base64(s) end
  if how == "base64url" then return b64url(s) end
  return util.hex(s)
end

-- OAEP with SHA-256 for both the label hash and MGF1, through libcrypto directly.
local ffi_ok, ffi = pcall(require, "ffi")
local C
local function oaep256(pem, data)
  if not C then
    assert(ffi_ok, "oaep-sha256 needs LuaJIT FFI")
    ffi.cdef [[
      typedef struct bio_st BIO; typedef struct evp_pkey_st EVP_PKEY;
      typedef struct evp_pkey_ctx_st EVP_PKEY_CTX; typedef struct evp_md_st EVP_MD;
      BIO *BIO_new_mem_buf(const void *buf, int len); int BIO_free(BIO *a);
      EVP_PKEY *PEM_read_bio_PUBKEY(BIO *bp, EVP_PKEY **x, void *cb, void *u);
      void EVP_PKEY_free(EVP_PKEY *pkey);
      EVP_PKEY_CTX *EVP_PKEY_CTX_new(EVP_PKEY *pkey, void *e); void EVP_PKEY_CTX_free(EVP_PKEY_CTX *ctx);
      int EVP_PKEY_encrypt_init(EVP_PKEY_CTX *ctx);
      int EVP_PKEY_CTX_set_rsa_padding(EVP_PKEY_CTX *ctx, int pad);
      int EVP_PKEY_CTX_set_rsa_oaep_md(EVP_PKEY_CTX *ctx, const EVP_MD *md);
      int EVP_PKEY_CTX_set_rsa_mgf1_md(EVP_PKEY_CTX *ctx, const EVP_MD *md);
      const EVP_MD *EVP_sha256(void);
      int EVP_PKEY_encrypt(EVP_PKEY_CTX *ctx, unsigned char *out, size_t *outlen,
                           const unsigned char *in, size_t inlen);
    ]]
    local ok, lib = pcall(ffi.load, "libcrypto.so.3")
    C = ok and lib or ffi.load("crypto")
  end
  local bio = C.BIO_new_mem_buf(pem, #pem)
  local pk = C.PEM_read_bio_PUBKEY(bio, nil, nil, nil)
  C.BIO_free(bio)
  if pk == nil then error("cannot read the app public key") end
  local ctx = C.EVP_PKEY_CTX_new(pk, nil)
  local out = ffi.new("unsigned char[1024]")
  local outlen = ffi.new("size_t[1]", 1024)
  local ok = ctx ~= nil and C.EVP_PKEY_encrypt_init(ctx) == 1
    and C.EVP_PKEY_CTX_set_rsa_padding(ctx, 4) == 1
    and C.EVP_PKEY_CTX_set_rsa_oaep_md(ctx, C.EVP_sha256()) == 1
    and C.EVP_PKEY_CTX_set_rsa_mgf1_md(ctx, C.EVP_sha256()) == 1
    and C.EVP_PKEY_encrypt(ctx, out, outlen, data, #data) == 1
  if ctx ~= nil then C.EVP_PKEY_CTX_free(ctx) end
  C.EVP_PKEY_free(pk)
  if not ok then error("RSA OAEP-SHA256 encryption failed") end
  return ffi.string(out, outlen[0])
end

local key_cache = {}

local function rsa_encrypt(pem, data, padding)
  if padding == "oaep-sha256" then return oaep256(pem, data) end
  local k = key_cache[pem]
  if not k then k = pkey.new(pem); key_cache[pem] = k end
  local pad = padding == "oaep" and pkey.RSA_PKCS1_OAEP_PADDING or pkey.RSA_PKCS1_PADDING
  return k:encrypt(data, { rsaPadding = pad })
end

--- Encrypt a clear device secret for an app; returns deviceSecret, sessionKey (both encoded text).
function M.encrypt(secret, public_pem, scheme)
  local bits = scheme.key_bits
  local key = rand.bytes(bits / 8)
  local name = "aes-" .. bits .. "-" .. scheme.aes_mode
  local ct
  if scheme.aes_mode == "ecb" then
    ct = cipher.new(name):encrypt(key):final(secret)
  elseif scheme.aes_mode == "cbc" then
    local iv = rand.bytes(16)
    ct = iv .. cipher.new(name):encrypt(key, iv):final(secret)
  else
    local nonce = rand.bytes(12)
    local c = cipher.new(name):encrypt(key, nonce)
    local body = c:final(secret)
    ct = nonce .. body .. c:getTag(16)
  end
  local material = key
  if scheme.key_format == "base64" then material = ngx.encode_base64(key)
  elseif scheme.key_format == "hex" then material = util.hex(key) end
  local session = rsa_encrypt(public_pem, material, scheme.rsa_padding)
  return encode(ct, scheme.encoding), encode(session, scheme.encoding)
end

return M
