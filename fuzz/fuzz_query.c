/* Query canonicalisation and percent-encoding: parse_query, encode_query,
 * urlencode and signature (which sorts the query the same way).
 * Mode 0 (first byte even): the rest is a query string from outside.
 *   parse_query(s) = t  =>  parse_query(encode_query(t)) == t, and
 *   encode_query is canonical (names sorted, only unreserved bytes and %XX).
 * Mode 1: the rest is length-prefixed name/value pairs (a table from a caller).
 *   parse_query(encode_query(t)) == t for non-empty names, and
 *   signature(tok, sk, t, body, ts) == SHA-256 over the sorted pairs, computed here. */
#include "fuzz_common.h"
#include <openssl/evp.h>

static int unreserved(unsigned char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
         c == '-' || c == '_' || c == '.' || c == '~';
}

/* Tables at a and b (absolute) hold the same string pairs. */
static int same_table(lua_State *L, int a, int b) {
  size_t na = 0, nb = 0;
  lua_pushnil(L);
  while (lua_next(L, a) != 0) {
    na++;
    lua_pushvalue(L, -2);
    lua_rawget(L, b);
    if (lua_type(L, -1) != LUA_TSTRING || !lua_rawequal(L, -1, -2)) { lua_pop(L, 3); return 0; }
    lua_pop(L, 2);
  }
  lua_pushnil(L);
  while (lua_next(L, b) != 0) { nb++; lua_pop(L, 1); }
  return na == nb;
}

static int hexv(char c) { return c <= '9' ? c - '0' : c - 'A' + 10; }

/* The string at idx is canonical: name=value pairs joined by '&', every byte
 * unreserved or %XX (upper-case hex, only for bytes that need it), and the
 * decoded names strictly increasing as bytes. */
static void check_canonical(lua_State *L, int idx) {
  size_t n, i, pn = 0, cn = 0;
  const char *s = lua_tolstring(L, idx, &n);
  unsigned char *prev = malloc(n + 1), *cur = malloc(n + 1);
  int in_name = 1, have_prev = 0;
  FZ_CHECK(prev != NULL && cur != NULL, "malloc");
  for (i = 0; i < n; i++) {
    unsigned char c;
    if (s[i] == '&') {
      FZ_CHECK(!in_name, "pair without '='");
      in_name = 1; cn = 0;
      continue;
    }
    if (s[i] == '=') {
      size_t m = cn < pn ? cn : pn;
      int cmp = m ? memcmp(prev, cur, m) : 0;
      FZ_CHECK(in_name, "second '=' in a pair");
      FZ_CHECK(cn > 0, "empty name");
      FZ_CHECK(!have_prev || cmp < 0 || (cmp == 0 && pn < cn), "names not sorted");
      memcpy(prev, cur, cn); pn = cn; have_prev = 1;
      in_name = 0;
      continue;
    }
    if (s[i] == '%') {
      FZ_CHECK(i + 2 < n, "truncated escape");
      FZ_CHECK((s[i + 1] >= '0' && s[i + 1] <= '9') || (s[i + 1] >= 'A' && s[i + 1] <= 'F'), "bad escape");
      FZ_CHECK((s[i + 2] >= '0' && s[i + 2] <= '9') || (s[i + 2] >= 'A' && s[i + 2] <= 'F'), "bad escape");
      c = (unsigned char)(hexv(s[i + 1]) << 4 | hexv(s[i + 2]));
      FZ_CHECK(!unreserved(c), "unreserved byte was escaped");
      i += 2;
    } else {
      c = (unsigned char)s[i];
      FZ_CHECK(unreserved(c), "reserved byte left unescaped");
    }
    if (in_name) cur[cn++] = c;
  }
  FZ_CHECK(n == 0 || !in_name, "pair without '='");
  free(prev);
  free(cur);
}

typedef struct { const char *k, *v; size_t kn, vn; } pair;

static int pair_cmp(const void *a, const void *b) {
  const pair *x = a, *y = b;
  size_t n = x->kn < y->kn ? x->kn : y->kn;
  int c = n ? memcmp(x->k, y->k, n) : 0;
  if (c) return c;
  return (x->kn > y->kn) - (x->kn < y->kn);
}

/* Reference signature over the table at idx. */
static void ref_signature(lua_State *L, int idx, const char *body, size_t bn, char hex[65]) {
  size_t n = 0, i;
  pair *ps;
  EVP_MD_CTX *ctx = EVP_MD_CTX_new();
  unsigned char md[32];
  unsigned int mdlen = 0;
  lua_pushnil(L);
  while (lua_next(L, idx) != 0) { n++; lua_pop(L, 1); }
  ps = malloc((n ? n : 1) * sizeof *ps);
  FZ_CHECK(ps != NULL && ctx != NULL, "malloc");
  i = 0;
  lua_pushnil(L);
  while (lua_next(L, idx) != 0) {
    ps[i].k = lua_tolstring(L, -2, &ps[i].kn);             /* keys are strings: no conversion */
    ps[i].v = lua_tolstring(L, -1, &ps[i].vn);
    i++;
    lua_pop(L, 1);
  }
  qsort(ps, n, sizeof *ps, pair_cmp);
  EVP_DigestInit_ex(ctx, EVP_sha256(), NULL);
  EVP_DigestUpdate(ctx, "tok", 3);
  for (i = 0; i < n; i++) { EVP_DigestUpdate(ctx, ps[i].k, ps[i].kn); EVP_DigestUpdate(ctx, ps[i].v, ps[i].vn); }
  EVP_DigestUpdate(ctx, body, bn);
  EVP_DigestUpdate(ctx, "1572574909697", 13);
  EVP_DigestUpdate(ctx, "secret", 6);
  EVP_DigestFinal_ex(ctx, md, &mdlen);
  EVP_MD_CTX_free(ctx);
  free(ps);
  for (i = 0; i < 32; i++) snprintf(hex + 2 * i, 3, "%02x", md[i]);
}

/* parse_query(encode_query(t)) == t, canonical encoding; t at idx. */
static void round_trip(lua_State *L, int idx) {
  int e, t2;
  fz_fn(L, "encode_query");
  lua_pushvalue(L, idx);
  fz_call(L, 1, 1, "encode_query");
  e = lua_gettop(L);
  check_canonical(L, e);
  fz_fn(L, "parse_query");
  lua_pushvalue(L, e);
  fz_call(L, 1, 2, "parse_query of encode_query");
  FZ_CHECK(lua_istable(L, -2), "parse_query rejected encode_query's output");
  lua_pop(L, 1);
  t2 = lua_gettop(L);
  FZ_CHECK(same_table(L, idx, t2), "parse_query(encode_query(t)) ~= t");
  fz_fn(L, "encode_query");
  lua_pushvalue(L, t2);
  fz_call(L, 1, 1, "encode_query again");
  FZ_CHECK(lua_rawequal(L, -1, e), "encode_query not stable");
}

static void fz_one(const uint8_t *data, size_t size) {
  lua_State *L = fz_state();
  if (size < 1) return;
  if ((data[0] & 1) == 0) {
    fz_fn(L, "parse_query");
    lua_pushlstring(L, (const char *)data + 1, size - 1);
    fz_call(L, 1, 2, "parse_query");
    if (lua_isnil(L, 1)) {
      FZ_CHECK(lua_type(L, 2) == LUA_TSTRING, "parse_query failed without a message");
      return;
    }
    FZ_CHECK(lua_istable(L, 1), "parse_query returned a non-table");
    lua_settop(L, 1);
    round_trip(L, 1);
  } else {
    /* [klen][k…][vlen][v…]… ; the final leftover bytes are the body */
    size_t i = 1;
    const char *body = "";
    size_t bn = 0;
    char want[65];
    lua_newtable(L);                                        /* 1: t */
    while (i < size) {
      size_t kn = data[i++], vn;
      const char *k = (const char *)data + i;
      if (kn > size - i) { body = k; bn = size - i; break; }
      i += kn;
      if (i >= size) { body = k; bn = kn; break; }
      vn = data[i++];
      if (vn > size - i) vn = size - i;
      if (kn > 0) {
        lua_pushlstring(L, k, kn);
        lua_pushlstring(L, (const char *)data + i, vn);
        lua_rawset(L, 1);
      }
      i += vn;
    }
    round_trip(L, 1);
    lua_settop(L, 1);
    fz_fn(L, "signature");
    lua_pushliteral(L, "tok");
    lua_pushliteral(L, "secret");
    lua_pushvalue(L, 1);
    lua_pushlstring(L, body, bn);
    lua_pushliteral(L, "1572574909697");
    fz_call(L, 5, 1, "signature");
    ref_signature(L, 1, body, bn, want);
    FZ_CHECK(fz_bytes_equal(L, 2, want, 64), "signature differs from the reference");
  }
  return;
}
