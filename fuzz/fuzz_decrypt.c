/* decrypt_secret: the V2.4 sessionKey/deviceSecret envelope from the network,
 * against a fixed RSA key, under every scheme (RSA padding x AES mode x session
 * key format x text encoding).
 *
 * Input: [pad][mode][kf][enc][flags][split] then bytes; the first `split` bytes
 * are session-key material, the rest device-secret material.
 *   flags & 1   seal the session key: RSA-encrypt it here with the public key
 *               (else it is passed as is, so random ciphertexts reach RSA).
 *   flags & 2   with 1: the session key is a real AES key (16/24/32 bytes by
 *               (flags >> 4) % 3) in the scheme's key format; else arbitrary bytes.
 *   flags & 4   with 1|2: AES-encrypt the device-secret bytes here, so the whole
 *               envelope is valid; the result must then be exactly those bytes
 *               when they are printable, non-empty and within the size limits.
 *   flags & 8   text-encode material that is passed as is (reaches the binary layers).
 * Any outcome must be a printable string or nil, message; never a Lua error. */
#include "fuzz_common.h"
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <openssl/err.h>

/* A throw-away 1024-bit RSA key made for this target only (openssl genpkey);
 * it protects nothing. Fixed, so a crashing input reproduces. 1024 bits keeps
 * the private-key operation fast enough for fuzzing. */
static const char test_key_pem[] =
  "-----BEGIN PRIVATE KEY-----\n"
  "MIICdgIBADANBgkqhkiG9w0BAQEFAASCAmAwggJcAgEAAoGBAK06PFvjpBkeLsDK\n"
  "g6uW9LMnXLCYulb7kGZrG9cOeIWUixSj1q56ziAXp/tunqO6gVvWkU4/6QsXuUsh\n"
  "T0YgTgMnJQ6Eskj6Hq71Wb5RNWJJmqojB3gKbTjytlHiigMWnUW4uksCBBWqhTRt\n"
  "zWg4re4+m1R+UQU6Qi4s9AzDltyXAgMBAAECgYBKD1LM6mc3Aet1K1/d1X0qtxJu\n"
  "we0w0P6sevB9IkeuvJI1sdJP6FsF53c/DM0wLMWvcO3QqYxF3M+waj5NOfR/ukSE\n"
  "fLJ6PvPDf45enB5tmJgTV2KEsM5Kxhh3N+shu19DzgWT4X2L2uktq3I3N33DtKgH\n"
  "G03I1PeuBB6axmR30QJBAN4BQORCRWXMHEXswJOezO1HhYO+APd1a1pDCt8hXghb\n"
  "G/RdWF1N0CqJ9esUk3E87mCLpsZct402Ilq7bexUtAkCQQDHwN+txKy9nGukMrBL\n"
  "Nxb2w8MX5GK28+7ZckBQCOL6txVVuUr8MQv2VAdm2Nu1E69cSV6el4mmuEW2frDC\n"
  "A3OfAkBS2dDn3rubdAMRLXvpG5iK7Ogs9FnUACQiOWbzQrafE7FpDvUNTR7k4Tu/\n"
  "kZw85Gpp6XRCDxQJRSypA83QJwRRAkEAkCfhRMZq42u/QwBRufZH3E3qvZNUqjPg\n"
  "a4zIXPoM1GLMQtE2DEpZF6wMq2xVIpjSNQe+ATXbYTYbGVjUty9GgQJAPAFqzesI\n"
  "Bgaot2qJAeVmDiUa9+vbkhw+btXIomsrX3e8izLj0/UFS3BSM3x0TsG+vWd+N+Hu\n"
  "cckrlcArvmgtvg==\n"
  "-----END PRIVATE KEY-----\n"
  ;

static const char *const pads[] = {"pkcs1", "oaep", "oaep-sha256"};
static const char *const modes[] = {"ecb", "cbc", "gcm"};
static const char *const kfs[] = {"raw", "base64", "hex"};
static const char *const encs[] = {"base64", "base64url", "hex"};

static EVP_PKEY *pub;
static int key_ref = LUA_NOREF;

static void init(lua_State *L) {
  BIO *bio;
  if (pub != NULL) return;
  bio = BIO_new_mem_buf(test_key_pem, -1);
  pub = PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL);
  BIO_free(bio);
  FZ_CHECK(pub != NULL, "test key");
  fz_fn(L, "load_private_key");
  lua_pushstring(L, test_key_pem);
  fz_call(L, 1, 1, "load_private_key");
  FZ_CHECK(!lua_isnil(L, -1), "module refused the test key");
  key_ref = luaL_ref(L, LUA_REGISTRYINDEX);
}

/* Text encoding as the gateway would send it (standard base64 with padding,
 * URL-safe without, lower-case hex); pushes the string. */
static void push_encoded(lua_State *L, int enc, const unsigned char *p, size_t n) {
  static const char std[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  static const char url[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  luaL_Buffer b;
  size_t i;
  luaL_buffinit(L, &b);
  if (enc == 2) {
    static const char digits[] = "0123456789abcdef";
    for (i = 0; i < n; i++) { luaL_addchar(&b, digits[p[i] >> 4]); luaL_addchar(&b, digits[p[i] & 15]); }
  } else {
    const char *a = enc == 1 ? url : std;
    for (i = 0; i + 2 < n; i += 3) {
      unsigned v = (unsigned)p[i] << 16 | (unsigned)p[i + 1] << 8 | p[i + 2];
      luaL_addchar(&b, a[v >> 18]); luaL_addchar(&b, a[(v >> 12) & 63]);
      luaL_addchar(&b, a[(v >> 6) & 63]); luaL_addchar(&b, a[v & 63]);
    }
    if (n - i == 1) {
      unsigned v = (unsigned)p[i] << 16;
      luaL_addchar(&b, a[v >> 18]); luaL_addchar(&b, a[(v >> 12) & 63]);
      if (enc == 0) luaL_addstring(&b, "==");
    } else if (n - i == 2) {
      unsigned v = (unsigned)p[i] << 16 | (unsigned)p[i + 1] << 8;
      luaL_addchar(&b, a[v >> 18]); luaL_addchar(&b, a[(v >> 12) & 63]); luaL_addchar(&b, a[(v >> 6) & 63]);
      if (enc == 0) luaL_addchar(&b, '=');
    }
  }
  luaL_pushresult(&b);
}

/* RSA-encrypts p with the public half; 0 when it does not fit the padding. */
static int rsa_seal(int pad, const unsigned char *p, size_t n, unsigned char *out, size_t *outlen) {
  EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new(pub, NULL);
  size_t max = pad == 0 ? 128 - 11 : pad == 1 ? 128 - 42 : 128 - 66;
  int ok;
  FZ_CHECK(ctx != NULL, "ctx");
  if (n > max) { EVP_PKEY_CTX_free(ctx); return 0; }
  ok = EVP_PKEY_encrypt_init(ctx) == 1 &&
       EVP_PKEY_CTX_set_rsa_padding(ctx, pad == 0 ? RSA_PKCS1_PADDING : RSA_PKCS1_OAEP_PADDING) == 1;
  if (ok && pad != 0) {
    const EVP_MD *md = pad == 1 ? EVP_sha1() : EVP_sha256();
    ok = EVP_PKEY_CTX_set_rsa_oaep_md(ctx, md) == 1 && EVP_PKEY_CTX_set_rsa_mgf1_md(ctx, md) == 1;
  }
  *outlen = 128;
  ok = ok && EVP_PKEY_encrypt(ctx, out, outlen, p, n) == 1;
  EVP_PKEY_CTX_free(ctx);
  FZ_CHECK(ok, "RSA seal");
  return 1;
}

/* AES-encrypts pt under key in mode: ECB/CBC with PKCS#7 padding (CBC: IV
 * first), GCM: 12-byte nonce, ciphertext, 16-byte tag. Returns a malloc'd buffer. */
static unsigned char *aes_seal(int mode, const unsigned char *key, size_t keylen,
                               const unsigned char *pt, size_t n, size_t *outlen) {
  const EVP_CIPHER *c;
  EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
  unsigned char iv[16], *out = malloc(n + 64), *ct;
  size_t ivlen = mode == 1 ? 16 : mode == 2 ? 12 : 0, i;
  int l1 = 0, l2 = 0, ok;
  FZ_CHECK(ctx != NULL && out != NULL, "malloc");
  for (i = 0; i < sizeof iv; i++) iv[i] = (unsigned char)(i * 37 + n);
  if (mode == 0) c = keylen == 16 ? EVP_aes_128_ecb() : keylen == 24 ? EVP_aes_192_ecb() : EVP_aes_256_ecb();
  else if (mode == 1) c = keylen == 16 ? EVP_aes_128_cbc() : keylen == 24 ? EVP_aes_192_cbc() : EVP_aes_256_cbc();
  else c = keylen == 16 ? EVP_aes_128_gcm() : keylen == 24 ? EVP_aes_192_gcm() : EVP_aes_256_gcm();
  memcpy(out, iv, ivlen);
  ct = out + ivlen;
  ok = EVP_EncryptInit_ex(ctx, c, NULL, NULL, NULL) == 1 &&
       (mode != 2 || EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, 12, NULL) == 1) &&
       EVP_EncryptInit_ex(ctx, NULL, NULL, key, ivlen ? iv : NULL) == 1 &&
       EVP_EncryptUpdate(ctx, ct, &l1, pt, (int)n) == 1 &&
       EVP_EncryptFinal_ex(ctx, ct + l1, &l2) == 1 &&
       (mode != 2 || EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, 16, ct + l1 + l2) == 1);
  FZ_CHECK(ok, "AES seal");
  *outlen = ivlen + (size_t)(l1 + l2) + (mode == 2 ? 16 : 0);
  EVP_CIPHER_CTX_free(ctx);
  return out;
}

static void fz_one(const uint8_t *data, size_t size) {
  lua_State *L = fz_state();
  int pad, mode, kf, enc, flags, expect = 0;     /* expect: 1 = must succeed, -1 = must fail, 0 = either */
  const unsigned char *skm, *dsm;
  size_t skn, dsn, split, sklen_enc, dslen_enc, ctlen = 0;
  unsigned char key[32], kraw[80], sealed[128];
  size_t keylen = 0, krawn = 0, sealedn = 0, i;
  int printable = 1;

  if (size < 6) return;
  init(L);
  pad = data[0] % 3; mode = data[1] % 3; kf = data[2] % 3; enc = data[3] % 3;
  flags = data[4]; split = data[5];
  skm = data + 6;
  skn = size - 6 < split ? size - 6 : split;
  dsm = skm + skn;
  dsn = size - 6 - skn;

  fz_fn(L, "decrypt_secret");                            /* 1 */
  lua_rawgeti(L, LUA_REGISTRYINDEX, key_ref);            /* 2 */

  /* 3: sessionKey */
  if (flags & 1) {
    if (flags & 2) {
      keylen = (size_t)16 + 8 * (size_t)((flags >> 4) % 3);
      memset(key, 0, sizeof key);
      memcpy(key, skm, skn < keylen ? skn : keylen);
      if (kf == 0) { memcpy(kraw, key, keylen); krawn = keylen; }
      else {
        const char *t;
        push_encoded(L, kf == 1 ? 0 : 2, key, keylen);
        t = lua_tolstring(L, -1, &krawn);
        memcpy(kraw, t, krawn);
        lua_pop(L, 1);
      }
    } else {
      krawn = skn < sizeof kraw ? skn : sizeof kraw;
      memcpy(kraw, skm, krawn);
    }
    if (!rsa_seal(pad, kraw, krawn, sealed, &sealedn)) return;   /* does not fit this padding */
    push_encoded(L, enc, sealed, sealedn);
  } else if (flags & 8) {
    push_encoded(L, enc, skm, skn);
  } else {
    lua_pushlstring(L, (const char *)skm, skn);
  }
  sklen_enc = lua_rawlen(L, 3);

  /* 4: deviceSecret */
  if ((flags & 7) == 7) {
    unsigned char *ct = aes_seal(mode, key, keylen, dsm, dsn, &ctlen);
    push_encoded(L, enc, ct, ctlen);
    free(ct);
    ctlen -= mode == 1 ? 16 : mode == 2 ? 28 : 0;
    for (i = 0; i < dsn; i++) if (dsm[i] < 0x20 || dsm[i] > 0x7e) printable = 0;
    dslen_enc = lua_rawlen(L, 4);
    expect = (dsn > 0 && printable && ctlen <= 4096 && sklen_enc <= 8192 && dslen_enc <= 8192) ? 1 : -1;
  } else if (flags & 8) {
    push_encoded(L, enc, dsm, dsn);
  } else {
    lua_pushlstring(L, (const char *)dsm, dsn);
  }
  lua_pushstring(L, pads[pad]);
  lua_pushstring(L, modes[mode]);
  lua_pushstring(L, kfs[kf]);
  lua_pushstring(L, encs[enc]);
  fz_call(L, 7, 2, "decrypt_secret");

  if (lua_isnil(L, 1)) {
    FZ_CHECK(lua_type(L, 2) == LUA_TSTRING, "failed without a message");
    FZ_CHECK(expect != 1, "a valid envelope did not decrypt");
  } else {
    size_t n;
    const char *s = lua_tolstring(L, 1, &n);
    FZ_CHECK(s != NULL && n > 0, "empty or non-string secret");
    for (i = 0; i < n; i++) FZ_CHECK(s[i] >= 0x20 && s[i] <= 0x7e, "non-printable secret returned");
    FZ_CHECK(expect != -1, "an envelope that must fail decrypted");
    if (expect == 1) FZ_CHECK(n == dsn && memcmp(s, dsm, n) == 0, "decrypted secret differs from the plaintext");
  }
  ERR_clear_error();
  return;
}
