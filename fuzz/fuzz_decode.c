/* decode(s, "base64"|"base64url"|"hex"): the codecs every sessionKey and
 * deviceSecret from the network goes through. First byte picks the encoding.
 * Oracle: a decode that succeeds is exact — the input, without white space and
 * padding, is the canonical encoding of the bytes (b64encode / lower-case hex),
 * and decoding that encoding again gives the same bytes. */
#include "fuzz_common.h"

static const char *const encs[] = {"base64", "base64url", "hex"};

static void fz_one(const uint8_t *data, size_t size) {
  lua_State *L = fz_state();
  int enc;
  const char *in, *out, *canon;
  size_t inlen, outlen, canonlen, i, k = 0;
  char *stripped;
  if (size < 1) return;
  enc = data[0] % 3;
  in = (const char *)data + 1;
  inlen = size - 1;

  fz_fn(L, "decode");
  lua_pushlstring(L, in, inlen);
  lua_pushstring(L, encs[enc]);
  fz_call(L, 2, 2, "decode");                              /* 1: bytes|nil 2: nil|message */
  if (lua_isnil(L, 1)) {
    FZ_CHECK(lua_type(L, 2) == LUA_TSTRING, "decode failed without a message");
    return;
  }
  FZ_CHECK(lua_type(L, 1) == LUA_TSTRING, "decode returned a non-string");
  out = lua_tolstring(L, 1, &outlen);

  /* canonical form of the bytes */
  if (enc == 2) {
    static const char digits[] = "0123456789abcdef";
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (i = 0; i < outlen; i++) {
      luaL_addchar(&b, digits[(unsigned char)out[i] >> 4]);
      luaL_addchar(&b, digits[(unsigned char)out[i] & 15]);
    }
    luaL_pushresult(&b);                                   /* 3 */
  } else {
    fz_fn(L, "b64encode");
    lua_pushvalue(L, 1);
    lua_pushboolean(L, enc == 1);
    fz_call(L, 2, 1, "b64encode");                         /* 3 */
  }
  canon = lua_tolstring(L, 3, &canonlen);

  /* the input without white space and '=' (hex: lower-cased) */
  stripped = malloc(inlen + 1);
  FZ_CHECK(stripped != NULL, "malloc");
  for (i = 0; i < inlen; i++) {
    char c = in[i];
    if (enc != 2 && (c == ' ' || c == '\n' || c == '\r' || c == '\t' || c == '=')) continue;
    if (enc == 2 && c >= 'A' && c <= 'F') c = (char)(c - 'A' + 'a');
    stripped[k++] = c;
  }
  while (enc == 0 && canonlen > 0 && canon[canonlen - 1] == '=') canonlen--;
  FZ_CHECK(k == canonlen && memcmp(stripped, canon, k) == 0, "decode accepted a non-canonical input");
  free(stripped);

  /* and back */
  fz_fn(L, "decode");
  lua_pushvalue(L, 3);
  lua_pushstring(L, encs[enc]);
  fz_call(L, 2, 1, "decode of canonical");
  FZ_CHECK(fz_bytes_equal(L, -1, out, outlen), "decode(encode(x)) ~= x");
  return;
}
