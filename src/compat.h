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

/* LuaJIT 2.1 provides luaL_setfuncs, luaL_testudata and luaL_setmetatable. */

#endif
