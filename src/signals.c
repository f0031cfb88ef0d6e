/* interrupt_on(names): SIGTERM and SIGHUP (a CI job's timeout, a closed ssh session) end the command the way
 * Ctrl-C does in the stand-alone interpreters: the next Lua instruction raises "interrupted!", so the command
 * says what state it leaves (OUTCOME UNKNOWN and the recovery command during a replace; "--resume" during a
 * batch) instead of dying silently. As lua.c does for SIGINT: the handler only sets a hook (lua_sethook is
 * safe to call from a signal handler) and restores the default action, so a second signal kills at once.
 * For the command-line tool only: a library must not take a host program's signals. */
#include <signal.h>
#include <string.h>
#include "enos.h"

static lua_State *main_L = NULL;

static void stop_hook(lua_State *L, lua_Debug *ar) {
  (void)ar;
  lua_sethook(L, NULL, 0, 0);
  luaL_error(L, "interrupted!");
}

static void on_signal(int sig) {
  signal(sig, SIG_DFL);
  if (main_L != NULL) lua_sethook(main_L, stop_hook, LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
}

/* interrupt_on({"TERM", "HUP", …}) -> true */
static int l_interrupt_on(lua_State *L) {
  size_t i, n;
  luaL_checktype(L, 1, LUA_TTABLE);
  n = enos_rawlen(L, 1);
  if (lua_pushthread(L) != 1) return luaL_error(L, "interrupt_on: call it from the main thread");
  lua_pop(L, 1);
  main_L = L;
  for (i = 1; i <= n; i++) {
    const char *name;
    int sig;
    lua_rawgeti(L, 1, (int)i);
    name = luaL_checkstring(L, -1);
    if (strcmp(name, "TERM") == 0) sig = SIGTERM;
    else if (strcmp(name, "HUP") == 0) sig = SIGHUP;
    else if (strcmp(name, "INT") == 0) sig = SIGINT;
    else return luaL_error(L, "interrupt_on: unknown signal %s", name);
    lua_pop(L, 1);
    if (signal(sig, on_signal) == SIG_ERR) return luaL_error(L, "interrupt_on: cannot catch SIG%s", name);
  }
  lua_pushboolean(L, 1);
  return 1;
}

static const luaL_Reg signal_funcs[] = {
  {"interrupt_on", l_interrupt_on},
  {NULL, NULL}
};

void enos_open_signals(lua_State *L) {
  luaL_setfuncs(L, signal_funcs, 0);
}
