/* The blocking transport: one libcurl easy handle per client, reused so that
 * connections are kept alive. send(req) -> res | nil, err (see docs/design.md). */
#include <string.h>
#include "http.h"

typedef struct {
  enos_xfer x;
  enos_http_opts o;
  int open;
} enos_easy;

/* parse_headers(raw) -> table; exposed for tests and fuzzing. */
static int l_parse_headers(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  return enos_push_headers(L, s, n);
}

static enos_easy *check_easy(lua_State *L, int idx) {
  enos_easy *h = luaL_checkudata(L, idx, ENOS_EASY_MT);
  if (!h->open) luaL_argerror(L, idx, "transport is closed");
  return h;
}

/* easy{timeout=, connect_timeout=, cafile=, capath=, verify_tls=, user_agent=, max_body=} */
static int l_easy(lua_State *L) {
  enos_easy *h;
  const char *bad;
  if (lua_isnoneornil(L, 1)) { lua_settop(L, 0); lua_newtable(L); }
  luaL_checktype(L, 1, LUA_TTABLE);
  h = lua_newuserdata(L, sizeof *h);
  memset(h, 0, sizeof *h);
  luaL_getmetatable(L, ENOS_EASY_MT);
  lua_setmetatable(L, -2);
  enos_http_opts_read(L, 1, &h->o);
  h->open = 1;                                  /* from here __gc frees what follows */
  bad = enos_xfer_init(&h->x, &h->o);
  if (bad) return luaL_error(L, "enos: libcurl rejected %s", bad);
  return 1;
}

/* h:send{method=, url=, headers={name=value}, body=, timeout=} -> res | nil, err */
static int easy_send(lua_State *L) {
  enos_easy *h = check_easy(L, 1);
  const char *bad = enos_xfer_prepare(L, 2, &h->x, &h->o, 0);
  CURLcode rc;
  if (bad) return luaL_error(L, "enos: %s", bad);
  rc = curl_easy_perform(h->x.curl);
  curl_easy_setopt(h->x.curl, CURLOPT_POSTFIELDS, (char *)NULL);
  return enos_xfer_finish(L, &h->x, rc);
}

static int easy_close(lua_State *L) {
  enos_easy *h = luaL_checkudata(L, 1, ENOS_EASY_MT);
  if (h->open) {
    enos_xfer_free(&h->x);
    enos_http_opts_free(&h->o);
    h->open = 0;
  }
  return 0;
}

static int easy_tostring(lua_State *L) {
  enos_easy *h = luaL_checkudata(L, 1, ENOS_EASY_MT);
  lua_pushstring(L, h->open ? "enos.easy (libcurl)" : "enos.easy (closed)");
  return 1;
}

static const luaL_Reg easy_methods[] = {
  {"send", easy_send},
  {"close", easy_close},
  {NULL, NULL}
};

static const luaL_Reg easy_funcs[] = {
  {"easy", l_easy},
  {"parse_headers", l_parse_headers},
  {NULL, NULL}
};

void enos_open_easy(lua_State *L) {
  luaL_newmetatable(L, ENOS_EASY_MT);
  lua_pushcfunction(L, easy_close);
  lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, easy_close);
  lua_setfield(L, -2, "__close");
  lua_pushcfunction(L, easy_tostring);
  lua_setfield(L, -2, "__tostring");
  luaL_newlib(L, easy_methods);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
  luaL_setfuncs(L, easy_funcs, 0);
}
