/* Response-header parsing (enos_push_headers, via parse_headers): the raw
 * header block libcurl hands over is whatever the server sent.
 * Oracle: names are non-empty, < 128 bytes, lower-case, without ':' or a line
 * break or surrounding blanks; values carry no line break; every name found
 * occurs in the input (case-insensitively). */
#include "fuzz_common.h"
#include <ctype.h>

static int occurs_ci(const char *hay, size_t hn, const char *needle, size_t nn) {
  size_t i, j;
  if (nn > hn) return 0;
  for (i = 0; i + nn <= hn; i++) {
    for (j = 0; j < nn; j++)
      if (tolower((unsigned char)hay[i + j]) != (unsigned char)needle[j]) break;
    if (j == nn) return 1;
  }
  return 0;
}

static void fz_one(const uint8_t *data, size_t size) {
  lua_State *L = fz_state();
  fz_fn(L, "parse_headers");
  lua_pushlstring(L, (const char *)data, size);
  fz_call(L, 1, 1, "parse_headers");
  FZ_CHECK(lua_istable(L, 1), "parse_headers returned a non-table");
  lua_pushnil(L);
  while (lua_next(L, 1) != 0) {
    size_t kn, vn, i;
    const char *k, *v;
    FZ_CHECK(lua_type(L, -2) == LUA_TSTRING && lua_type(L, -1) == LUA_TSTRING, "non-string pair");
    k = lua_tolstring(L, -2, &kn);
    v = lua_tolstring(L, -1, &vn);
    FZ_CHECK(kn > 0 && kn < 128, "name length");
    for (i = 0; i < kn; i++) {
      FZ_CHECK(!(k[i] >= 'A' && k[i] <= 'Z'), "upper-case name");
      FZ_CHECK(k[i] != ':' && k[i] != '\n', "':' or line break in a name");
    }
    FZ_CHECK(k[kn - 1] != ' ' && k[kn - 1] != '\t', "trailing blank in a name");
    FZ_CHECK(memchr(v, '\n', vn) == NULL, "line break in a value");
    FZ_CHECK(occurs_ci((const char *)data, size, k, kn), "name not in the input");
    lua_pop(L, 1);
  }
  return;
}
