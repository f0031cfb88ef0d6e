/* Digests, the gateway's token and request signatures, and query encoding.
 * Strings that contain the secret key are assembled in malloc'd buffers and
 * cleansed before they are freed; Lua is not called while one is live. */
#include <stdlib.h>
#include <string.h>
#include <stdio.h>
#include <math.h>
#include <openssl/evp.h>
#include "enos.h"

typedef struct { const char *s; size_t n; } span;
typedef struct { span k, v; } kv;

/* SHA-256, fetched once per Lua state: OpenSSL 3 looks EVP_sha256() up again on every digest
 * otherwise. The functions below share it as their first upvalue (freed by its __gc). */
typedef struct { EVP_MD *md; } md_box;

static int md_gc(lua_State *L) {
  md_box *b = lua_touserdata(L, 1);
  if (b != NULL && b->md != NULL) { EVP_MD_free(b->md); b->md = NULL; }
  return 0;
}

static const EVP_MD *sha256_of(lua_State *L) {
  md_box *b = lua_touserdata(L, lua_upvalueindex(1));
  return b != NULL && b->md != NULL ? b->md : EVP_sha256();
}

static int sha256(const EVP_MD *md, const void *data, size_t n, unsigned char out[32]) {
  unsigned int len = 0;
  return EVP_Digest(data, n, out, &len, md, NULL) == 1 && len == 32;
}

#define SMALL_SIGN 2048     /* signed strings up to this size are joined on the stack */
#define SMALL_QUERY 16      /* queries up to this many parameters are sorted on the stack */

static int l_sha256_hex(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  unsigned char md[32];
  char hex[65];
  if (!sha256(sha256_of(L), s, n, md)) return luaL_error(L, "enos: SHA-256 failed");
  enos_hex_lower(md, 32, hex);
  lua_pushlstring(L, hex, 64);
  return 1;
}

/* A timestamp argument: a decimal string or an integral number (ms). */
static span check_timestamp(lua_State *L, int idx, char *tmp, size_t tmpsz) {
  span t;
  if (lua_type(L, idx) == LUA_TNUMBER) {
    lua_Number x = lua_tonumber(L, idx);
    if (x < 0 || x > 9007199254740992.0 || floor(x) != x)
      luaL_argerror(L, idx, "timestamp must be a non-negative integer (ms)");
    t.n = (size_t)snprintf(tmp, tmpsz, "%.0f", (double)x);
    t.s = tmp;
  } else {
    size_t i;
    t.s = luaL_checklstring(L, idx, &t.n);
    if (t.n == 0 || t.n > 20) luaL_argerror(L, idx, "timestamp must be 1-20 decimal digits");
    for (i = 0; i < t.n; i++)
      if (t.s[i] < '0' || t.s[i] > '9') luaL_argerror(L, idx, "timestamp must be decimal digits");
  }
  return t;
}

/* Hashes the concatenation of parts into hex; the joined buffer is cleansed. */
static int hash_parts(lua_State *L, const span *parts, size_t nparts, char hex[65]) {
  size_t total = 0, i, off = 0;
  unsigned char md[32];
  char small[SMALL_SIGN], *buf = small;
  int ok;
  for (i = 0; i < nparts; i++) total += parts[i].n;
  if (total > sizeof small) {
    buf = malloc(total);
    if (buf == NULL) return luaL_error(L, "enos: out of memory");
  }
  for (i = 0; i < nparts; i++) {
    if (parts[i].n) memcpy(buf + off, parts[i].s, parts[i].n);
    off += parts[i].n;
  }
  ok = sha256(sha256_of(L), buf, total, md);
  if (buf == small) enos_cleanse(small, total);
  else enos_free_secret(buf, total);
  if (!ok) return luaL_error(L, "enos: SHA-256 failed");
  enos_hex_lower(md, 32, hex);
  enos_cleanse(md, sizeof md);
  return 0;
}

/* token_encryption(app_key, timestamp, app_secret) -> hex(SHA-256(AK .. T .. SK)) */
static int l_token_encryption(lua_State *L) {
  char tbuf[32], hex[65];
  span parts[3];
  parts[0].s = luaL_checklstring(L, 1, &parts[0].n);
  parts[1] = check_timestamp(L, 2, tbuf, sizeof tbuf);
  parts[2].s = luaL_checklstring(L, 3, &parts[2].n);
  hash_parts(L, parts, 3, hex);
  lua_pushlstring(L, hex, 64);
  return 1;
}

static int kv_cmp(const void *a, const void *b) {
  const kv *x = a, *y = b;
  size_t n = x->k.n < y->k.n ? x->k.n : y->k.n;
  int c = memcmp(x->k.s, y->k.s, n);
  if (c != 0) return c;
  return (x->k.n > y->k.n) - (x->k.n < y->k.n);
}

/* Collects a {name = value} table of strings, sorted by name in byte order, into `small`
 * (SMALL_QUERY entries) or, for a larger query, a userdata left on the stack (freed by the GC). */
static kv *collect_query(lua_State *L, int idx, size_t *count, kv *small) {
  size_t n = 0, i = 0;
  kv *arr = small;
  if (lua_isnoneornil(L, idx)) { *count = 0; return NULL; }
  luaL_checktype(L, idx, LUA_TTABLE);
  lua_pushnil(L);
  while (lua_next(L, idx) != 0) { n++; lua_pop(L, 1); }
  if (n > SMALL_QUERY) arr = lua_newuserdata(L, n * sizeof *arr);
  lua_pushnil(L);
  while (lua_next(L, idx) != 0) {
    if (lua_type(L, -2) != LUA_TSTRING || enos_rawlen(L, -2) == 0)
      luaL_error(L, "query parameter names must be non-empty strings");
    if (lua_type(L, -1) != LUA_TSTRING)
      luaL_error(L, "query parameter '%s' must be a string", lua_tostring(L, -2));
    arr[i].k.s = lua_tolstring(L, -2, &arr[i].k.n);
    arr[i].v.s = lua_tolstring(L, -1, &arr[i].v.n);
    i++;
    lua_pop(L, 1);
  }
  qsort(arr, n, sizeof *arr, kv_cmp);
  *count = n;
  return arr;
}

/* The signature over a sorted query (arguments as for signature()); pushes the hex. */
static void push_signature(lua_State *L, const kv *q, size_t nq) {
  char tbuf[32], hex[65];
  size_t i, np = 0;
  span token, secret, body = {"", 0}, ts, small[2 * SMALL_QUERY + 4], *parts = small;
  token.s = luaL_checklstring(L, 1, &token.n);
  secret.s = luaL_checklstring(L, 2, &secret.n);
  if (!lua_isnoneornil(L, 4)) body.s = luaL_checklstring(L, 4, &body.n);
  ts = check_timestamp(L, 5, tbuf, sizeof tbuf);
  if (nq > SMALL_QUERY) parts = lua_newuserdata(L, (2 * nq + 4) * sizeof *parts);
  parts[np++] = token;
  for (i = 0; i < nq; i++) { parts[np++] = q[i].k; parts[np++] = q[i].v; }
  parts[np++] = body;
  parts[np++] = ts;
  parts[np++] = secret;
  hash_parts(L, parts, np, hex);
  lua_pushlstring(L, hex, 64);
}

/* signature(token, app_secret, query, body|nil, timestamp)
 *   -> hex(SHA-256(token .. k1 v1 k2 v2 … .. body .. T .. SK)) */
static int l_signature(lua_State *L) {
  size_t nq;
  kv small[SMALL_QUERY];
  const kv *q = collect_query(L, 3, &nq, small);
  push_signature(L, q, nq);
  return 1;
}

static int unreserved(unsigned char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
         c == '-' || c == '_' || c == '.' || c == '~';
}

static void add_encoded(luaL_Buffer *b, const char *s, size_t n) {
  static const char digits[] = "0123456789ABCDEF";
  size_t i;
  for (i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (unreserved(c)) {
      luaL_addchar(b, (char)c);
    } else {
      luaL_addchar(b, '%');
      luaL_addchar(b, digits[c >> 4]);
      luaL_addchar(b, digits[c & 15]);
    }
  }
}

/* urlencode(s): RFC 3986 percent-encoding (space is %20, '+' is %2B). */
static int l_urlencode(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  add_encoded(&b, s, n);
  luaL_pushresult(&b);
  return 1;
}

/* encode_query({name = value}) -> "a=1&b=2", names sorted, both sides encoded. */
static void push_encoded_query(lua_State *L, const kv *q, size_t n) {
  size_t i;
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  for (i = 0; i < n; i++) {
    if (i) luaL_addchar(&b, '&');
    add_encoded(&b, q[i].k.s, q[i].k.n);
    luaL_addchar(&b, '=');
    add_encoded(&b, q[i].v.s, q[i].v.n);
  }
  luaL_pushresult(&b);
}

static int l_encode_query(lua_State *L) {
  size_t n;
  kv small[SMALL_QUERY];
  const kv *q = collect_query(L, 1, &n, small);
  push_encoded_query(L, q, n);
  return 1;
}

/* sign_query(token, app_secret, query, body|nil, timestamp) -> signature, encode_query(query):
 * what a request needs, with the query sorted once. */
static int l_sign_query(lua_State *L) {
  size_t nq;
  kv small[SMALL_QUERY];
  const kv *q = collect_query(L, 3, &nq, small);
  push_signature(L, q, nq);
  push_encoded_query(L, q, nq);
  return 2;
}

static int hexval(int c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/* Decodes s[0..n) into out (at least n bytes); '+' is a space as servers read
 * form-style queries. Returns the decoded length or -1 on a bad escape. */
static long decode_component(const char *s, size_t n, char *out) {
  size_t i, o = 0;
  for (i = 0; i < n; i++) {
    if (s[i] == '%') {
      int hi, lo;
      if (i + 2 >= n) return -1;
      hi = hexval((unsigned char)s[i + 1]);
      lo = hexval((unsigned char)s[i + 2]);
      if (hi < 0 || lo < 0) return -1;
      out[o++] = (char)(hi * 16 + lo);
      i += 2;
    } else if (s[i] == '+') {
      out[o++] = ' ';
    } else {
      out[o++] = s[i];
    }
  }
  return (long)o;
}

/* parse_query("a=1&b=x%20y") -> {a = "1", b = "x y"} | nil, message.
 * A name without '=' gets the empty string; a repeated name is an error
 * (the gateway's signature is defined over unique names). */
static int l_parse_query(lua_State *L) {
  size_t n, start = 0;
  const char *s = luaL_checklstring(L, 1, &n);
  char *tmp = lua_newuserdata(L, n ? n : 1);
  lua_newtable(L);
  if (n > 0 && s[0] == '?') start = 1;
  while (start <= n) {
    size_t end = start, eq;
    long kl, vl;
    while (end < n && s[end] != '&') end++;
    if (end > start) {
      eq = start;
      while (eq < end && s[eq] != '=') eq++;
      kl = decode_component(s + start, eq - start, tmp);
      if (kl <= 0) {
        lua_pushnil(L);
        lua_pushstring(L, kl == 0 ? "empty query parameter name" : "malformed percent-encoding in query");
        return 2;
      }
      lua_pushlstring(L, tmp, (size_t)kl);
      lua_pushvalue(L, -1);
      lua_rawget(L, -3);
      if (!lua_isnil(L, -1)) {
        lua_pushnil(L);
        lua_pushstring(L, "repeated query parameter name");
        return 2;
      }
      lua_pop(L, 1);
      vl = eq < end ? decode_component(s + eq + 1, end - eq - 1, tmp) : 0;
      if (vl < 0) {
        lua_pushnil(L);
        lua_pushstring(L, "malformed percent-encoding in query");
        return 2;
      }
      lua_pushlstring(L, tmp, (size_t)vl);
      lua_rawset(L, -3);
    }
    start = end + 1;
  }
  return 1;
}

static const luaL_Reg sign_funcs[] = {
  {"sha256_hex", l_sha256_hex},
  {"token_encryption", l_token_encryption},
  {"signature", l_signature},
  {"urlencode", l_urlencode},
  {"encode_query", l_encode_query},
  {"sign_query", l_sign_query},
  {"parse_query", l_parse_query},
  {NULL, NULL}
};

void enos_open_sign(lua_State *L) {
  md_box *b = lua_newuserdata(L, sizeof *b);
  b->md = EVP_MD_fetch(NULL, "SHA256", NULL);          /* NULL: EVP_sha256() is used instead */
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, md_gc);
  lua_setfield(L, -2, "__gc");
  lua_setmetatable(L, -2);
  luaL_setfuncs(L, sign_funcs, 1);
}
