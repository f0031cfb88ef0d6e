/* The PEM key loader (load_private_key): bytes from a user's key file.
 * Oracle: it returns a key or nil, message, never raises; a key reports a
 * positive size, prints without key material, closes twice without harm and
 * refuses use after close. */
#include "fuzz_common.h"

static void fz_one(const uint8_t *data, size_t size) {
  lua_State *L = fz_state();
  const char *s;
  fz_fn(L, "load_private_key");
  lua_pushlstring(L, (const char *)data, size);
  fz_call(L, 1, 2, "load_private_key");
  if (lua_isnil(L, 1)) {
    FZ_CHECK(lua_type(L, 2) == LUA_TSTRING, "load_private_key failed without a message");
    return;
  }
  lua_settop(L, 1);
  fz_fn(L, "is_key");
  lua_pushvalue(L, 1);
  fz_call(L, 1, 1, "is_key");
  FZ_CHECK(lua_toboolean(L, -1), "is_key(key) is false");
  lua_pop(L, 1);
  lua_getfield(L, 1, "bits");
  lua_pushvalue(L, 1);
  fz_call(L, 1, 1, "key:bits");
  FZ_CHECK(lua_tointeger(L, -1) > 0, "key of no size");
  lua_pop(L, 1);
  s = luaL_tolstring(L, 1, NULL);
  FZ_CHECK(strncmp(s, "enos.key (RSA ", 14) == 0, "tostring(key)");
  lua_pop(L, 1);
  lua_getfield(L, 1, "close");
  lua_pushvalue(L, 1);
  fz_call(L, 1, 0, "key:close");
  lua_getfield(L, 1, "close");
  lua_pushvalue(L, 1);
  fz_call(L, 1, 0, "key:close twice");
  lua_getfield(L, 1, "bits");
  lua_pushvalue(L, 1);
  FZ_CHECK(lua_pcall(L, 1, 1, 0) != LUA_OK, "closed key still usable");
  return;
}
