/* Lua 5.1 / LuaJIT to 5.4 API differences the core needs. */
#ifndef ENOS_COMPAT_H
#define ENOS_COMPAT_H

#include <lua.h>
#include <lauxlib.h>

#if LUA_VERSION_NUM < 502
#  define enos_rawlen(L, i) lua_objlen((L), (i))
#  ifndef luaL_newlib
#    define luaL_newlib(L, l) (lua_newtable(L), luaL_setfuncs((L), (l), 0))
#  endif
#else
#  define enos_rawlen(L, i) lua_rawlen((L), (i))
#endif

/* Lua 5.1's C API has no luaL_setfuncs or luaL_testudata (LuaJIT 2.1 adds them): on the 5.1 API the core uses
 * its own, so one build loads in both interpreters (lib/lua/5.1 serves plain Lua 5.1 and LuaJIT). */
#if LUA_VERSION_NUM < 502
static inline void enos_setfuncs(lua_State *L, const luaL_Reg *l, int nup) {
  luaL_checkstack(L, nup, "too many upvalues");
  for (; l->name != NULL; l++) {
    int i;
    for (i = 0; i < nup; i++) lua_pushvalue(L, -nup);
    lua_pushcclosure(L, l->func, nup);
    lua_setfield(L, -(nup + 2), l->name);
  }
  lua_pop(L, nup);
}
#  define luaL_setfuncs enos_setfuncs
static inline void *enos_testudata(lua_State *L, int ud, const char *tname) {
  void *p = lua_touserdata(L, ud);
  if (p == NULL || !lua_getmetatable(L, ud)) return NULL;
  luaL_getmetatable(L, tname);
  if (!lua_rawequal(L, -1, -2)) p = NULL;
  lua_pop(L, 2);
  return p;
}
#  define luaL_testudata enos_testudata
#endif

#endif
