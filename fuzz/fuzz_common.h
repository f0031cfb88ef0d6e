/* Shared by the libFuzzer targets: one lua_State with enos.core loaded (the
 * module's functions are static, so the targets call them through the Lua API
 * exactly as lua/enos does). A Lua error from a call that got arguments of the
 * right types is itself a finding: those functions return nil, message. */
#ifndef ENOS_FUZZ_COMMON_H
#define ENOS_FUZZ_COMMON_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

int luaopen_enos_core(lua_State *L);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
static void fz_one(const uint8_t *data, size_t size);   /* each target's body */

static lua_State *fz_L;
static int fz_core_ref = LUA_NOREF;

#define FZ_CHECK(cond, what) do { if (!(cond)) fz_die(what, #cond, __LINE__); } while (0)

static void fz_die(const char *what, const char *cond, int line) {
  fprintf(stderr, "enos fuzz: %s (%s, line %d)\n", what, cond, line);
  if (fz_L && lua_gettop(fz_L) > 0 && lua_type(fz_L, -1) == LUA_TSTRING)
    fprintf(stderr, "  top of stack: %s\n", lua_tostring(fz_L, -1));
  abort();
}

/* The state, emptied; created with the module loaded on first use. */
static lua_State *fz_state(void) {
  if (fz_L == NULL) {
    fz_L = luaL_newstate();
    FZ_CHECK(fz_L != NULL, "luaL_newstate failed");
    luaL_openlibs(fz_L);
    luaL_requiref(fz_L, "enos.core", luaopen_enos_core, 0);
    fz_core_ref = luaL_ref(fz_L, LUA_REGISTRYINDEX);
  }
  lua_settop(fz_L, 0);
  return fz_L;
}

/* Pushes core[name]. */
static void fz_fn(lua_State *L, const char *name) {
  lua_rawgeti(L, LUA_REGISTRYINDEX, fz_core_ref);
  lua_getfield(L, -1, name);
  lua_remove(L, -2);
  FZ_CHECK(lua_isfunction(L, -1), name);
}

/* lua_pcall that must not raise. */
static void fz_call(lua_State *L, int nargs, int nres, const char *what) {
  if (lua_pcall(L, nargs, nres, 0) != LUA_OK) fz_die(what, "raised a Lua error", __LINE__);
}

static __attribute__((unused)) int fz_bytes_equal(lua_State *L, int i, const void *p, size_t n) {
  size_t m;
  const char *s = lua_tolstring(L, i, &m);
  return s != NULL && m == n && (n == 0 || memcmp(s, p, n) == 0);
}

/* Each input ends with a full collection: every __gc has run (so a leak in a
 * close path shows), and the run frees what it allocated, which keeps
 * libFuzzer's per-input leak check from scanning the heap after every input. */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  fz_one(data, size);
  lua_settop(fz_L, 0);
  lua_gc(fz_L, LUA_GCCOLLECT, 0);
  return 0;
}

#endif
