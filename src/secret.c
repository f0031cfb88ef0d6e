/* Secrets: base64/hex codecs, RSA private keys ("enos.key"), and decryption of
 * the V2.4 deviceSecret/sessionKey envelope under a named scheme.
 * Every buffer that held key material or plaintext is cleansed before free. */
#include <stdlib.h>
#include <string.h>
#include <stdio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <openssl/err.h>
#include <openssl/x509.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include "secret.h"

typedef struct {
  EVP_PKEY *pkey;
} enos_key;

/* ---- codecs ------------------------------------------------------------ */

static int b64val(unsigned char c, int url) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (!url && c == '+') return 62;
  if (!url && c == '/') return 63;
  if (url && c == '-') return 62;
  if (url && c == '_') return 63;
  return -1;
}

/* Decodes base64 (url = 0: standard alphabet, 1: URL-safe). Padding is
 * optional, but when present it must be correct; ASCII white space is skipped.
 * Returns a malloc'd buffer (free with enos_free_secret) or NULL. */
static unsigned char *b64_decode(const char *s, size_t n, int url, size_t *outlen) {
  unsigned char *out = malloc(n / 4 * 3 + 3);
  size_t o = 0, i, pad = 0;
  unsigned acc = 0;
  int bits = 0, nchars = 0;
  if (out == NULL) return NULL;
  for (i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    int v;
    if (c == ' ' || c == '\n' || c == '\r' || c == '\t') continue;
    if (c == '=') { pad++; continue; }
    if (pad) goto bad;                       /* data after padding */
    v = b64val(c, url);
    if (v < 0) goto bad;
    acc = (acc << 6) | (unsigned)v;
    bits += 6;
    nchars++;
    if (bits >= 8) {
      bits -= 8;
      out[o++] = (unsigned char)(acc >> bits);
      acc &= (1u << bits) - 1;
    }
  }
  if (nchars % 4 == 1) goto bad;             /* impossible length */
  if (pad && (nchars + (int)pad) % 4 != 0) goto bad;
  if (pad > 2) goto bad;
  if (acc != 0) goto bad;                    /* non-canonical trailing bits */
  *outlen = o;
  return out;
bad:
  enos_free_secret(out, n / 4 * 3 + 3);
  return NULL;
}

static unsigned char *hex_decode(const char *s, size_t n, size_t *outlen) {
  unsigned char *out;
  size_t i;
  if (n % 2 != 0) return NULL;
  out = malloc(n / 2 + 1);
  if (out == NULL) return NULL;
  for (i = 0; i < n; i += 2) {
    int hi, lo;
    char a = s[i], b = s[i + 1];
    hi = (a >= '0' && a <= '9') ? a - '0' : (a >= 'a' && a <= 'f') ? a - 'a' + 10 : (a >= 'A' && a <= 'F') ? a - 'A' + 10 : -1;
    lo = (b >= '0' && b <= '9') ? b - '0' : (b >= 'a' && b <= 'f') ? b - 'a' + 10 : (b >= 'A' && b <= 'F') ? b - 'A' + 10 : -1;
    if (hi < 0 || lo < 0) { enos_free_secret(out, n / 2 + 1); return NULL; }
    out[i / 2] = (unsigned char)(hi * 16 + lo);
  }
  *outlen = n / 2;
  return out;
}

enum { ENC_BASE64, ENC_BASE64URL, ENC_HEX };
static const char *const enc_names[] = {"base64", "base64url", "hex", NULL};

static unsigned char *decode_as(int enc, const char *s, size_t n, size_t *outlen) {
  if (enc == ENC_HEX) return hex_decode(s, n, outlen);
  return b64_decode(s, n, enc == ENC_BASE64URL, outlen);
}

/* b64decode(s [, "base64"|"base64url"|"hex"]) -> bytes | nil, message */
static int l_decode(lua_State *L) {
  size_t n, outlen = 0;
  const char *s = luaL_checklstring(L, 1, &n);
  int enc = luaL_checkoption(L, 2, "base64", enc_names);
  unsigned char *out = decode_as(enc, s, n, &outlen);
  if (out == NULL) {
    lua_pushnil(L);
    lua_pushfstring(L, "not valid %s", enc_names[enc]);
    return 2;
  }
  lua_pushlstring(L, (const char *)out, outlen);
  enos_free_secret(out, outlen ? outlen : 1);
  return 1;
}

/* b64encode(bytes [, url]) -> text (URL-safe form has no padding) */
static int l_b64encode(lua_State *L) {
  static const char std[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  static const char url[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  size_t n, i;
  const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &n);
  int urlsafe = lua_toboolean(L, 2);
  const char *a = urlsafe ? url : std;
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  for (i = 0; i + 2 < n; i += 3) {
    unsigned v = (unsigned)s[i] << 16 | (unsigned)s[i + 1] << 8 | s[i + 2];
    luaL_addchar(&b, a[v >> 18]); luaL_addchar(&b, a[(v >> 12) & 63]);
    luaL_addchar(&b, a[(v >> 6) & 63]); luaL_addchar(&b, a[v & 63]);
  }
  if (n - i == 1) {
    unsigned v = (unsigned)s[i] << 16;
    luaL_addchar(&b, a[v >> 18]); luaL_addchar(&b, a[(v >> 12) & 63]);
    if (!urlsafe) luaL_addstring(&b, "==");
  } else if (n - i == 2) {
    unsigned v = (unsigned)s[i] << 16 | (unsigned)s[i + 1] << 8;
    luaL_addchar(&b, a[v >> 18]); luaL_addchar(&b, a[(v >> 12) & 63]);
    luaL_addchar(&b, a[(v >> 6) & 63]);
    if (!urlsafe) luaL_addchar(&b, '=');
  }
  luaL_pushresult(&b);
  return 1;
}

/* ---- keys ---------------------------------------------------------------- */

static int no_password(char *buf, int size, int rwflag, void *u) {
  (void)buf; (void)size; (void)rwflag; (void)u;
  return 0;                                  /* encrypted keys are refused */
}

/* load_private_key(pem) -> key | nil, message */
static int l_load_private_key(lua_State *L) {
  size_t n;
  const char *pem = luaL_checklstring(L, 1, &n);
  enos_key *k;
  BIO *bio;
  EVP_PKEY *pkey;
  if (n > 1u << 20) {
    lua_pushnil(L);
    lua_pushstring(L, "private key PEM is larger than 1 MiB");
    return 2;
  }
  k = lua_newuserdata(L, sizeof *k);
  k->pkey = NULL;
  luaL_getmetatable(L, ENOS_KEY_MT);
  lua_setmetatable(L, -2);
  bio = BIO_new_mem_buf(pem, (int)n);
  if (bio == NULL) return luaL_error(L, "enos: out of memory");
  pkey = PEM_read_bio_PrivateKey(bio, NULL, no_password, NULL);
  BIO_free(bio);
  if (pkey == NULL) {
    const char *why = strstr(pem, "ENCRYPTED") != NULL
      ? "private key is encrypted with a passphrase; decrypt it first (openssl pkcs8 -topk8 -nocrypt)"
      : "not a PEM private key (expected -----BEGIN PRIVATE KEY----- or RSA PRIVATE KEY)";
    ERR_clear_error();
    lua_pushnil(L);
    lua_pushstring(L, why);
    return 2;
  }
  if (EVP_PKEY_get_base_id(pkey) != EVP_PKEY_RSA) {
    EVP_PKEY_free(pkey);
    lua_pushnil(L);
    lua_pushstring(L, "private key is not an RSA key");
    return 2;
  }
  k->pkey = pkey;
  return 1;
}

static enos_key *check_key(lua_State *L, int idx) {
  enos_key *k = luaL_checkudata(L, idx, ENOS_KEY_MT);
  if (k->pkey == NULL) luaL_argerror(L, idx, "key is closed");
  return k;
}

static int key_bits(lua_State *L) {
  enos_key *k = check_key(L, 1);
  lua_pushinteger(L, EVP_PKEY_get_bits(k->pkey));
  return 1;
}

static int key_tostring(lua_State *L) {
  enos_key *k = luaL_checkudata(L, 1, ENOS_KEY_MT);
  if (k->pkey == NULL) lua_pushstring(L, "enos.key (closed)");
  else lua_pushfstring(L, "enos.key (RSA %d-bit private key)", EVP_PKEY_get_bits(k->pkey));
  return 1;
}

static int key_gc(lua_State *L) {
  enos_key *k = luaL_checkudata(L, 1, ENOS_KEY_MT);
  if (k->pkey != NULL) {
    EVP_PKEY_free(k->pkey);                  /* OpenSSL clears RSA bignums on free */
    k->pkey = NULL;
  }
  return 0;
}

/* ---- decryption ---------------------------------------------------------- */

enum { PAD_PKCS1, PAD_OAEP, PAD_OAEP256 };
static const char *const pad_names[] = {"pkcs1", "oaep", "oaep-sha256", NULL};
enum { MODE_ECB, MODE_CBC, MODE_GCM };
static const char *const mode_names[] = {"ecb", "cbc", "gcm", NULL};
enum { KF_RAW, KF_BASE64, KF_HEX };
static const char *const kf_names[] = {"raw", "base64", "hex", NULL};

typedef struct {
  unsigned char *p;
  size_t n;
} sbuf;

static void sbuf_free(sbuf *b) {
  enos_free_secret(b->p, b->n ? b->n : 1);
  b->p = NULL;
  b->n = 0;
}

static const char *rsa_decrypt(EVP_PKEY *pkey, int pad, const sbuf *in, sbuf *out) {
  EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new(pkey, NULL);
  const char *err = NULL;
  size_t len = 0;
  if (ctx == NULL) return "out of memory";
  if (EVP_PKEY_decrypt_init(ctx) != 1) { err = "RSA decrypt init failed"; goto done; }
  if (EVP_PKEY_CTX_set_rsa_padding(ctx, pad == PAD_PKCS1 ? RSA_PKCS1_PADDING : RSA_PKCS1_OAEP_PADDING) != 1) {
    err = "RSA padding not supported"; goto done;
  }
  if (pad != PAD_PKCS1) {
    const EVP_MD *md = pad == PAD_OAEP ? EVP_sha1() : EVP_sha256();
    if (EVP_PKEY_CTX_set_rsa_oaep_md(ctx, md) != 1 || EVP_PKEY_CTX_set_rsa_mgf1_md(ctx, md) != 1) {
      err = "RSA OAEP digest not supported"; goto done;
    }
  }
  if (EVP_PKEY_decrypt(ctx, NULL, &len, in->p, in->n) != 1 || len == 0) {
    err = "sessionKey does not decrypt with this private key and padding"; goto done;
  }
  out->p = malloc(len);
  out->n = len;
  if (out->p == NULL) { out->n = 0; err = "out of memory"; goto done; }
  if (EVP_PKEY_decrypt(ctx, out->p, &len, in->p, in->n) != 1) {
    sbuf_free(out);
    err = "sessionKey does not decrypt with this private key and padding"; goto done;
  }
  if (len < out->n) {                        /* keep n = allocation for cleansing; record length */
    enos_cleanse(out->p + len, out->n - len);
  }
  out->n = len;
done:
  EVP_PKEY_CTX_free(ctx);
  ERR_clear_error();
  return err;
}

static const EVP_CIPHER *aes_cipher(int mode, size_t keylen) {
  switch (mode) {
    case MODE_ECB: return keylen == 16 ? EVP_aes_128_ecb() : keylen == 24 ? EVP_aes_192_ecb() : EVP_aes_256_ecb();
    case MODE_CBC: return keylen == 16 ? EVP_aes_128_cbc() : keylen == 24 ? EVP_aes_192_cbc() : EVP_aes_256_cbc();
    default:       return keylen == 16 ? EVP_aes_128_gcm() : keylen == 24 ? EVP_aes_192_gcm() : EVP_aes_256_gcm();
  }
}

static const char *aes_decrypt(int mode, const sbuf *key, const sbuf *in, sbuf *out) {
  const unsigned char *iv = NULL, *ct = in->p;
  unsigned char tag[16];
  size_t ctlen = in->n;
  EVP_CIPHER_CTX *ctx;
  const char *err = NULL;
  int l1 = 0, l2 = 0;
  if (mode == MODE_CBC) {
    if (in->n < 32 || in->n % 16) return "deviceSecret has a length that is not IV + AES blocks";
    iv = in->p; ct = in->p + 16; ctlen = in->n - 16;
  } else if (mode == MODE_GCM) {
    if (in->n < 12 + 16 + 1) return "deviceSecret is too short for nonce + data + tag";
    iv = in->p; ct = in->p + 12; ctlen = in->n - 28;
    memcpy(tag, in->p + in->n - 16, 16);
  } else if (in->n == 0 || in->n % 16) {
    return "deviceSecret has a length that is not whole AES blocks";
  }
  if (ctlen > 4096) return "deviceSecret is implausibly long";
  ctx = EVP_CIPHER_CTX_new();
  if (ctx == NULL) return "out of memory";
  out->n = ctlen + 16;
  out->p = malloc(out->n);
  if (out->p == NULL) { out->n = 0; err = "out of memory"; goto done; }
  if (EVP_DecryptInit_ex(ctx, aes_cipher(mode, key->n), NULL, NULL, NULL) != 1) { err = "AES init failed"; goto fail; }
  if (mode == MODE_GCM && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, 12, NULL) != 1) { err = "AES-GCM init failed"; goto fail; }
  if (EVP_DecryptInit_ex(ctx, NULL, NULL, key->p, iv) != 1) { err = "AES init failed"; goto fail; }
  if (EVP_DecryptUpdate(ctx, out->p, &l1, ct, (int)ctlen) != 1) { err = "AES decryption failed"; goto fail; }
  if (mode == MODE_GCM &&
      EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, 16, tag) != 1) {
    err = "AES-GCM tag setup failed"; goto fail;
  }
  if (EVP_DecryptFinal_ex(ctx, out->p + l1, &l2) != 1) {
    err = mode == MODE_GCM ? "deviceSecret fails its GCM tag check (wrong key or scheme)"
                           : "deviceSecret has bad padding after decryption (wrong key or scheme)";
    goto fail;
  }
  enos_cleanse(out->p + l1 + l2, out->n - (size_t)(l1 + l2));
  out->n = (size_t)(l1 + l2);
  goto done;
fail:
  sbuf_free(out);
done:
  EVP_CIPHER_CTX_free(ctx);
  ERR_clear_error();
  return err;
}

void enos_decrypt_read_args(lua_State *L, int idx, enos_decrypt_args *a) {
  enos_key *k = check_key(L, idx);
  const char *sk = luaL_checklstring(L, idx + 1, &a->skn);
  const char *ds = luaL_checklstring(L, idx + 2, &a->dsn);
  a->pad = luaL_checkoption(L, idx + 3, "pkcs1", pad_names);
  a->mode = luaL_checkoption(L, idx + 4, "ecb", mode_names);
  a->kf = luaL_checkoption(L, idx + 5, "raw", kf_names);
  a->enc = luaL_checkoption(L, idx + 6, "base64", enc_names);
  a->sk = malloc(a->skn + 1);
  a->ds = malloc(a->dsn + 1);
  if (a->sk == NULL || a->ds == NULL || EVP_PKEY_up_ref(k->pkey) != 1) {
    free(a->sk); free(a->ds);
    a->sk = a->ds = NULL;
    luaL_error(L, "enos: out of memory");
  }
  memcpy(a->sk, sk, a->skn); a->sk[a->skn] = '\0';
  memcpy(a->ds, ds, a->dsn); a->ds[a->dsn] = '\0';
  a->pkey = k->pkey;
}

void enos_decrypt_args_free(enos_decrypt_args *a) {
  if (a->pkey) EVP_PKEY_free(a->pkey);
  if (a->sk) enos_free_secret(a->sk, a->skn + 1);
  if (a->ds) enos_free_secret(a->ds, a->dsn + 1);
  a->pkey = NULL;
  a->sk = a->ds = NULL;
}

/* Touches no Lua state: runs in the worker thread as well as in the caller's. */
const char *enos_decrypt_run(const enos_decrypt_args *a, unsigned char **out, size_t *outn) {
  sbuf skraw = {NULL, 0}, kraw = {NULL, 0}, key = {NULL, 0}, ct = {NULL, 0}, pt = {NULL, 0};
  const char *err = NULL;
  size_t i;
  *out = NULL;
  *outn = 0;
  if (a->skn > 8192 || a->dsn > 8192) { err = "sessionKey or deviceSecret is implausibly long"; goto done; }
  skraw.p = decode_as(a->enc, a->sk, a->skn, &skraw.n);
  if (skraw.p == NULL) { err = a->enc == ENC_HEX ? "sessionKey is not valid hex" : "sessionKey is not valid base64"; goto done; }
  if (skraw.n == 0) { err = "sessionKey is empty"; goto done; }
  err = rsa_decrypt(a->pkey, a->pad, &skraw, &kraw);
  if (err) goto done;
  if (a->kf == KF_RAW) {
    key = kraw; kraw.p = NULL; kraw.n = 0;
  } else {
    key.p = a->kf == KF_HEX ? hex_decode((const char *)kraw.p, kraw.n, &key.n)
                            : b64_decode((const char *)kraw.p, kraw.n, 0, &key.n);
    if (key.p == NULL) { err = "session key is not the expected text encoding"; goto done; }
  }
  if (key.n != 16 && key.n != 24 && key.n != 32) { err = "session key is not 16, 24 or 32 bytes"; goto done; }
  ct.p = decode_as(a->enc, a->ds, a->dsn, &ct.n);
  if (ct.p == NULL) { err = a->enc == ENC_HEX ? "deviceSecret is not valid hex" : "deviceSecret is not valid base64"; goto done; }
  err = aes_decrypt(a->mode, &key, &ct, &pt);
  if (err) goto done;
  if (pt.n == 0) { err = "decrypted secret is empty"; goto done; }
  for (i = 0; i < pt.n; i++) {
    if (pt.p[i] < 0x20 || pt.p[i] > 0x7e) { err = "decrypted secret is not printable text (wrong key or scheme)"; goto done; }
  }
  *out = pt.p; *outn = pt.n;
  pt.p = NULL; pt.n = 0;
done:
  sbuf_free(&skraw); sbuf_free(&kraw); sbuf_free(&key); sbuf_free(&ct); sbuf_free(&pt);
  return err;
}

/* decrypt_secret(key, sessionKey, deviceSecret, rsa_padding, aes_mode, key_format, encoding)
 *   -> plaintext | nil, message */
static int l_decrypt_secret(lua_State *L) {
  enos_decrypt_args a;
  unsigned char *out = NULL;
  size_t outn = 0;
  const char *err;
  memset(&a, 0, sizeof a);
  enos_decrypt_read_args(L, 1, &a);
  err = enos_decrypt_run(&a, &out, &outn);
  enos_decrypt_args_free(&a);
  if (err != NULL) {
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
  }
  lua_pushlstring(L, (const char *)out, outn);
  enos_free_secret(out, outn);
  return 1;
}

/* ---- certificate signing requests ----------------------------------------- */

/* The SHA-256 of a public key's DER SubjectPublicKeyInfo, as 64 hex digits (out[65]): 1 | 0 on failure. */
static int pubkey_sha256_hex(EVP_PKEY *pk, char *out) {
  unsigned char *der = NULL, md[EVP_MAX_MD_SIZE];
  unsigned int mdlen = 0, i;
  int n = i2d_PUBKEY(pk, &der), ok;
  if (n <= 0 || !der) return 0;
  ok = EVP_Digest(der, (size_t)n, md, &mdlen, EVP_sha256(), NULL);
  OPENSSL_free(der);
  if (ok != 1 || mdlen != 32) return 0;
  for (i = 0; i < mdlen; i++) snprintf(out + 2 * i, 3, "%02x", md[i]);
  return 1;
}

/* csr_info(pem) -> {key = "RSA" | "EC" | other, bits = n, curve = name | nil, subject = "CN=…"} | nil, message
 * A certificate signing request checked before it is sent: it must parse and its self-signature verify.
 * Everything is read into C locals and the request freed before anything is pushed (no leak on a Lua error). */
static int l_csr_info(lua_State *L) {
  size_t len;
  const char *pem = luaL_checklstring(L, 1, &len);
  const char *why = NULL, *key = "other";
  char subject[512], curve[64], fp[65];
  int bits = 0, id;
  BIO *bio, *out;
  X509_REQ *req;
  EVP_PKEY *pk;
  subject[0] = curve[0] = fp[0] = '\0';
  luaL_argcheck(L, len < 1024 * 1024, 1, "a CSR of less than 1 MiB expected");
  bio = BIO_new_mem_buf(pem, (int)len);
  if (!bio) return luaL_error(L, "enos: out of memory");
  req = PEM_read_bio_X509_REQ(bio, NULL, no_password, NULL);
  BIO_free(bio);
  if (!req) {
    ERR_clear_error();
    lua_pushnil(L);
    lua_pushliteral(L, "not a PEM certificate signing request (it does not parse)");
    return 2;
  }
  pk = X509_REQ_get0_pubkey(req);
  if (!pk) why = "it holds no public key";
  else if (X509_REQ_verify(req, pk) != 1) why = "its signature does not verify (altered, or not signed by its own key)";
  else if (!pubkey_sha256_hex(pk, fp)) why = "its public key cannot be encoded";
  if (!why) {
    id = EVP_PKEY_get_base_id(pk);
    bits = EVP_PKEY_get_bits(pk);
    if (id == EVP_PKEY_RSA) key = "RSA";
    else if (id == EVP_PKEY_EC) {
      size_t n = 0;
      key = "EC";
      if (EVP_PKEY_get_utf8_string_param(pk, OSSL_PKEY_PARAM_GROUP_NAME, curve, sizeof curve, &n) != 1) curve[0] = '\0';
    }
    out = BIO_new(BIO_s_mem());
    if (out) {
      if (X509_NAME_print_ex(out, X509_REQ_get_subject_name(req), 0, XN_FLAG_RFC2253) >= 0) {
        int n = BIO_read(out, subject, (int)sizeof subject - 1);
        subject[n > 0 ? n : 0] = '\0';
      }
      BIO_free(out);
    }
  }
  X509_REQ_free(req);
  ERR_clear_error();
  if (why) {
    lua_pushnil(L);
    lua_pushstring(L, why);
    return 2;
  }
  lua_createtable(L, 0, 4);
  lua_pushstring(L, key);
  lua_setfield(L, -2, "key");
  lua_pushinteger(L, bits);
  lua_setfield(L, -2, "bits");
  if (curve[0]) {
    lua_pushstring(L, curve);
    lua_setfield(L, -2, "curve");
  }
  lua_pushstring(L, subject);
  lua_setfield(L, -2, "subject");
  lua_pushstring(L, fp);
  lua_setfield(L, -2, "key_sha256");
  return 1;
}

/* cert_info(pem) -> {serial = decimal digits, key_sha256 = hex} | nil, message
 * Which key a certificate certifies (to recognise the one issued for a CSR: same key_sha256). */
static int l_cert_info(lua_State *L) {
  size_t len;
  const char *pem = luaL_checklstring(L, 1, &len);
  char fp[65], serial[128];
  const char *why = NULL;
  BIO *bio;
  X509 *crt;
  EVP_PKEY *pk;
  fp[0] = serial[0] = '\0';
  luaL_argcheck(L, len < 1024 * 1024, 1, "a certificate of less than 1 MiB expected");
  bio = BIO_new_mem_buf(pem, (int)len);
  if (!bio) return luaL_error(L, "enos: out of memory");
  crt = PEM_read_bio_X509(bio, NULL, no_password, NULL);
  BIO_free(bio);
  if (!crt) {
    ERR_clear_error();
    lua_pushnil(L);
    lua_pushliteral(L, "not a PEM certificate");
    return 2;
  }
  pk = X509_get0_pubkey(crt);
  if (!pk || !pubkey_sha256_hex(pk, fp)) why = "its public key cannot be read";
  else {
    BIGNUM *bn = ASN1_INTEGER_to_BN(X509_get0_serialNumber(crt), NULL);
    char *dec = bn ? BN_bn2dec(bn) : NULL;
    if (dec && strlen(dec) < sizeof serial) memcpy(serial, dec, strlen(dec) + 1);
    else why = "its serial number cannot be read";
    OPENSSL_free(dec);
    BN_free(bn);
  }
  X509_free(crt);
  ERR_clear_error();
  if (why) {
    lua_pushnil(L);
    lua_pushstring(L, why);
    return 2;
  }
  lua_createtable(L, 0, 2);
  lua_pushstring(L, serial);
  lua_setfield(L, -2, "serial");
  lua_pushstring(L, fp);
  lua_setfield(L, -2, "key_sha256");
  return 1;
}

/* is_key(v) -> boolean */
static int l_is_key(lua_State *L) {
  lua_pushboolean(L, luaL_testudata(L, 1, ENOS_KEY_MT) != NULL);
  return 1;
}

static const luaL_Reg key_methods[] = {
  {"bits", key_bits},
  {"close", key_gc},
  {NULL, NULL}
};

static const luaL_Reg secret_funcs[] = {
  {"decode", l_decode},
  {"b64encode", l_b64encode},
  {"load_private_key", l_load_private_key},
  {"is_key", l_is_key},
  {"decrypt_secret", l_decrypt_secret},
  {"csr_info", l_csr_info},
  {"cert_info", l_cert_info},
  {NULL, NULL}
};

void enos_open_secret(lua_State *L) {
  luaL_newmetatable(L, ENOS_KEY_MT);
  lua_pushcfunction(L, key_gc);
  lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, key_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pushstring(L, "enos.key");
  lua_setfield(L, -2, "__name");
  lua_pushboolean(L, 0);
  lua_setfield(L, -2, "__metatable");       /* no access to internals from Lua */
  luaL_newlib(L, key_methods);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
  luaL_setfuncs(L, secret_funcs, 0);
}
