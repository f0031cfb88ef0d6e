/* enos.core entry point: only luaopen_enos_core lives here.
 *
 * Every function of enos.core is used by the Lua layers, except these, public for tests and fuzzing only
 * (docs/architecture.md lists them too):
 *   b64encode              fuzz_decode's round trip (decode then encode must give the canonical input)
 *   encode_query, urlencode the signing specs check the canonical query encoding byte for byte
 *   parse_query            specs read the simulator's request log and stub requests
 *   parse_headers          fuzz_headers drives the reply-header parser (enos_push_headers) with raw bytes
 * They cost nothing at run time and keep the parsers under test through the same entry the transports use. */
#include <errno.h>
#include <string.h>
#include <time.h>
#include <openssl/crypto.h>
#include <curl/curl.h>
#include "enos.h"

static int curl_ready = 0;

/* versions() -> {enos=, libcurl=, openssl=, ssl_backend=} */
static int l_versions(lua_State *L) {
  curl_version_info_data *ci = curl_version_info(CURLVERSION_NOW);
  lua_createtable(L, 0, 4);
  lua_pushstring(L, ENOS_VERSION);
  lua_setfield(L, -2, "enos");
  lua_pushstring(L, ci && ci->version ? ci->version : "?");
  lua_setfield(L, -2, "libcurl");
  lua_pushstring(L, ci && ci->ssl_version ? ci->ssl_version : "none");
  lua_setfield(L, -2, "libcurl_ssl");
  lua_pushstring(L, OpenSSL_version(OPENSSL_VERSION));
  lua_setfield(L, -2, "openssl");
  lua_pushboolean(L, ci && (ci->features & CURL_VERSION_HTTP2));
  lua_setfield(L, -2, "http2");
  return 1;
}

/* now_ms() -> wall-clock Unix time in ms (the gateway's timestamps) */
static int l_now_ms(lua_State *L) {
  struct timespec ts;
  if (clock_gettime(CLOCK_REALTIME, &ts) != 0) return luaL_error(L, "enos: clock_gettime failed");
  lua_pushnumber(L, (lua_Number)ts.tv_sec * 1000 + (lua_Number)(ts.tv_nsec / 1000000));
  return 1;
}

/* monotonic_ms() -> a monotonic clock in ms (for durations and deadlines) */
static int l_monotonic_ms(lua_State *L) {
  double ms = enos_monotonic_ms();
  if (ms < 0) return luaL_error(L, "enos: clock_gettime failed");
  lua_pushnumber(L, (lua_Number)ms);
  return 1;
}

/* sleep(seconds): blocks the thread on the monotonic clock (restarted after a signal: the deadline holds).
 * For tools and scripts; inside nginx, enos yields to ngx.sleep instead. */
static int l_sleep(lua_State *L) {
  lua_Number s = luaL_checknumber(L, 1);
  struct timespec until;
  double whole;
  int rc;
  luaL_argcheck(L, s == s && s < 1e9, 1, "a number of seconds expected");
  if (s <= 0) return 0;
  if (clock_gettime(CLOCK_MONOTONIC, &until) != 0) return luaL_error(L, "enos: clock_gettime failed");
  whole = (double)(time_t)s;
  until.tv_sec += (time_t)whole;
  until.tv_nsec += (long)((s - whole) * 1e9);
  if (until.tv_nsec >= 1000000000L) { until.tv_sec += 1; until.tv_nsec -= 1000000000L; }
  do rc = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &until, NULL); while (rc == EINTR);
  if (rc != 0) return luaL_error(L, "enos: clock_nanosleep failed: %s", strerror(rc));
  return 0;
}

static const luaL_Reg core_funcs[] = {
  {"sleep", l_sleep},
  {"versions", l_versions},
  {"now_ms", l_now_ms},
  {"monotonic_ms", l_monotonic_ms},
  {NULL, NULL}
};

/* The module's one exported symbol: the Makefile builds with -fvisibility=hidden, so the enos_* functions
 * shared between the C files stay inside the .so (no clash with another library's symbols in nginx). */
__attribute__((visibility("default"))) LUALIB_API int luaopen_enos_core(lua_State *L);

__attribute__((visibility("default"))) LUALIB_API int luaopen_enos_core(lua_State *L) {
  if (!curl_ready) {
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
      return luaL_error(L, "enos: curl_global_init failed");
    curl_ready = 1;
  }
  luaL_newlib(L, core_funcs);
  enos_open_sign(L);
  enos_open_secret(L);
  enos_open_easy(L);
  enos_open_multi(L);
  enos_open_file(L);
  enos_open_http(L);
  enos_open_csv(L);
  enos_open_keyset(L);
  enos_open_signals(L);
  lua_pushliteral(L, ENOS_VERSION);
  lua_setfield(L, -2, "_VERSION");
  lua_pushliteral(L, "enos.core");
  lua_setfield(L, -2, "_NAME");
  return 1;
}
