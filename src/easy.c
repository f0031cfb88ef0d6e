/* The blocking transport: one libcurl easy handle per client, reused so that
 * connections are kept alive. send(req) -> res | nil, err (see design.md). */
#include <stdlib.h>
#include <string.h>
#include <ctype.h>
#include <curl/curl.h>
#include "enos.h"

#define DEFAULT_MAX_BODY (8u * 1024u * 1024u)

typedef struct {
  CURL *curl;
  long timeout_ms, connect_timeout_ms;
  enos_buf body, hdrs;
  struct curl_slist *slist;
  char errbuf[CURL_ERROR_SIZE];
} enos_easy;

/* ---- buffers and headers (shared with other transports) ----------------- */

int enos_buf_append(enos_buf *b, const char *p, size_t n) {
  if (b->limit && b->len + n > b->limit) { b->overflow = 1; return 0; }
  if (b->len + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap : 1024;
    char *np;
    while (cap < b->len + n + 1) cap *= 2;
    np = realloc(b->data, cap);
    if (np == NULL) return 0;
    b->data = np;
    b->cap = cap;
  }
  memcpy(b->data + b->len, p, n);
  b->len += n;
  b->data[b->len] = '\0';
  return 1;
}

void enos_buf_free(enos_buf *b) {
  free(b->data);
  b->data = NULL;
  b->len = b->cap = 0;
  b->overflow = 0;
}

static void slist_free_cleansed(struct curl_slist *l) {
  struct curl_slist *it;
  for (it = l; it != NULL; it = it->next)
    if (it->data) enos_cleanse(it->data, strlen(it->data));  /* headers carry the token */
  curl_slist_free_all(l);
}

/* Parses raw header lines ("Name: value\r\n"…) into a table with lower-case
 * names; repeated names are joined with ", ". Status lines are skipped. */
int enos_push_headers(lua_State *L, const char *raw, size_t len) {
  size_t i = 0;
  lua_newtable(L);
  while (i < len) {
    size_t end = i, colon, ns, ne, vs, ve, k;
    char name[128];
    while (end < len && raw[end] != '\n') end++;
    colon = i;
    while (colon < end && raw[colon] != ':') colon++;
    ns = i; ne = colon;
    while (ne > ns && (raw[ne - 1] == ' ' || raw[ne - 1] == '\t')) ne--;
    if (colon < end && ne > ns && ne - ns < sizeof name && !(end - i >= 5 && memcmp(raw + i, "HTTP/", 5) == 0)) {
      vs = colon + 1; ve = end;
      while (vs < ve && (raw[vs] == ' ' || raw[vs] == '\t')) vs++;
      while (ve > vs && (raw[ve - 1] == '\r' || raw[ve - 1] == ' ' || raw[ve - 1] == '\t')) ve--;
      for (k = ns; k < ne; k++) name[k - ns] = (char)tolower((unsigned char)raw[k]);
      lua_pushlstring(L, name, ne - ns);
      lua_pushvalue(L, -1);
      lua_rawget(L, -3);
      if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        lua_pushlstring(L, raw + vs, ve - vs);
      } else {
        lua_pushliteral(L, ", ");
        lua_pushlstring(L, raw + vs, ve - vs);
        lua_concat(L, 3);
      }
      lua_rawset(L, -3);
    }
    i = end + 1;
  }
  return 1;
}

/* parse_headers(raw) -> table; exposed for tests and fuzzing. */
static int l_parse_headers(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  return enos_push_headers(L, s, n);
}

/* ---- libcurl callbacks ---------------------------------------------------- */

static size_t on_body(char *p, size_t size, size_t nmemb, void *ud) {
  enos_buf *b = ud;
  size_t n = size * nmemb;
  return enos_buf_append(b, p, n) ? n : 0;
}

static size_t on_header(char *p, size_t size, size_t nmemb, void *ud) {
  enos_buf *b = ud;
  size_t n = size * nmemb;
  if (n >= 5 && memcmp(p, "HTTP/", 5) == 0) b->len = 0;   /* a new response (e.g. after 100) */
  return enos_buf_append(b, p, n) ? n : 0;
}

/* ---- the handle ---------------------------------------------------------- */

static enos_easy *check_easy(lua_State *L, int idx) {
  enos_easy *h = luaL_checkudata(L, idx, ENOS_EASY_MT);
  if (h->curl == NULL) luaL_argerror(L, idx, "transport is closed");
  return h;
}

static long opt_ms(lua_State *L, int idx, const char *field, long dflt) {
  lua_Number s;
  lua_getfield(L, idx, field);
  if (lua_isnil(L, -1)) { lua_pop(L, 1); return dflt; }
  if (lua_type(L, -1) != LUA_TNUMBER) luaL_error(L, "option '%s' must be a number of seconds", field);
  s = lua_tonumber(L, -1);
  lua_pop(L, 1);
  if (!(s > 0) || s > 86400) luaL_error(L, "option '%s' must be between 0 and 86400 seconds", field);
  return (long)(s * 1000 + 0.5);
}

static const char *opt_str(lua_State *L, int idx, const char *field) {
  const char *v;
  lua_getfield(L, idx, field);
  if (lua_isnil(L, -1)) { lua_pop(L, 1); return NULL; }
  if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "option '%s' must be a string", field);
  v = lua_tostring(L, -1);
  lua_pop(L, 1);                              /* the value stays referenced by the table */
  return v;
}

#define SETOPT(h, o, v) do { if (curl_easy_setopt((h)->curl, o, v) != CURLE_OK) { bad = #o; goto fail; } } while (0)

/* easy{timeout=, connect_timeout=, cafile=, capath=, verify_tls=, user_agent=, max_body=} */
static int l_easy(lua_State *L) {
  enos_easy *h;
  const char *cafile, *capath, *ua, *bad = NULL;
  int verify = 1;
  lua_Number max_body = DEFAULT_MAX_BODY;
  if (lua_isnoneornil(L, 1)) lua_newtable(L);
  luaL_checktype(L, 1, LUA_TTABLE);
  cafile = opt_str(L, 1, "cafile");
  capath = opt_str(L, 1, "capath");
  ua = opt_str(L, 1, "user_agent");
  lua_getfield(L, 1, "verify_tls");
  if (!lua_isnil(L, -1)) verify = lua_toboolean(L, -1);
  lua_pop(L, 1);
  lua_getfield(L, 1, "max_body");
  if (!lua_isnil(L, -1)) max_body = luaL_checknumber(L, -1);
  lua_pop(L, 1);
  if (!(max_body >= 1024) || max_body > 1024.0 * 1024 * 1024) luaL_error(L, "option 'max_body' must be 1 KiB .. 1 GiB");

  h = lua_newuserdata(L, sizeof *h);
  memset(h, 0, sizeof *h);
  luaL_getmetatable(L, ENOS_EASY_MT);
  lua_setmetatable(L, -2);
  h->timeout_ms = opt_ms(L, 1, "timeout", 30000);
  h->connect_timeout_ms = opt_ms(L, 1, "connect_timeout", 10000);
  h->body.limit = (size_t)max_body;
  h->curl = curl_easy_init();
  if (h->curl == NULL) return luaL_error(L, "enos: curl_easy_init failed");
  SETOPT(h, CURLOPT_NOSIGNAL, 1L);
  SETOPT(h, CURLOPT_FOLLOWLOCATION, 0L);
#if LIBCURL_VERSION_NUM >= 0x075500
  SETOPT(h, CURLOPT_PROTOCOLS_STR, "http,https");
#else
  SETOPT(h, CURLOPT_PROTOCOLS, (long)(CURLPROTO_HTTP | CURLPROTO_HTTPS));
#endif
  SETOPT(h, CURLOPT_SSL_VERIFYPEER, verify ? 1L : 0L);
  SETOPT(h, CURLOPT_SSL_VERIFYHOST, verify ? 2L : 0L);
  SETOPT(h, CURLOPT_SSLVERSION, (long)CURL_SSLVERSION_TLSv1_2);
  if (cafile) SETOPT(h, CURLOPT_CAINFO, cafile);
  if (capath) SETOPT(h, CURLOPT_CAPATH, capath);
  SETOPT(h, CURLOPT_USERAGENT, ua ? ua : "enos/" ENOS_VERSION);
  SETOPT(h, CURLOPT_TCP_KEEPALIVE, 1L);
  SETOPT(h, CURLOPT_ERRORBUFFER, h->errbuf);
  SETOPT(h, CURLOPT_WRITEFUNCTION, on_body);
  SETOPT(h, CURLOPT_WRITEDATA, &h->body);
  SETOPT(h, CURLOPT_HEADERFUNCTION, on_header);
  SETOPT(h, CURLOPT_HEADERDATA, &h->hdrs);
  return 1;
fail:
  curl_easy_cleanup(h->curl);
  h->curl = NULL;
  return luaL_error(L, "enos: libcurl rejected %s", bad);
}

static const char *curl_kind(CURLcode rc, int overflow) {
  switch (rc) {
    case CURLE_OPERATION_TIMEDOUT: return "timeout";
    case CURLE_SSL_CONNECT_ERROR: case CURLE_PEER_FAILED_VERIFICATION: case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CIPHER: case CURLE_SSL_CACERT_BADFILE: case CURLE_SSL_ISSUER_ERROR:
    case CURLE_SSL_CRL_BADFILE: case CURLE_SSL_PINNEDPUBKEYNOTMATCH: case CURLE_SSL_INVALIDCERTSTATUS:
    case CURLE_SSL_ENGINE_NOTFOUND: case CURLE_SSL_ENGINE_SETFAILED: case CURLE_SSL_ENGINE_INITFAILED:
    case CURLE_USE_SSL_FAILED: case CURLE_SSL_SHUTDOWN_FAILED:
      return "tls";
    case CURLE_WRITE_ERROR: return overflow ? "protocol" : "transport";
    case CURLE_UNSUPPORTED_PROTOCOL: case CURLE_URL_MALFORMAT: return "config";
    default: return "transport";
  }
}

/* h:send{method=, url=, headers={name=value}, body=, timeout=} */
static int easy_send(lua_State *L) {
  enos_easy *h = check_easy(L, 1);
  const char *method, *url, *body = NULL, *bad = NULL;
  size_t bodylen = 0;
  long timeout_ms, status = 0, reqsize = 0, nconn = 0;
  int hdr_tab, nh = 0, i;
  CURLcode rc;
  double total = 0;

  luaL_checktype(L, 2, LUA_TTABLE);
  url = opt_str(L, 2, "url");
  if (url == NULL) return luaL_error(L, "request 'url' must be a string");
  method = opt_str(L, 2, "method");
  if (method == NULL) method = "GET";
  lua_getfield(L, 2, "body");
  if (!lua_isnil(L, -1)) {
    if (lua_type(L, -1) != LUA_TSTRING) return luaL_error(L, "request 'body' must be a string");
    body = lua_tolstring(L, -1, &bodylen);
  }
  lua_pop(L, 1);
  timeout_ms = opt_ms(L, 2, "timeout", h->timeout_ms);

  /* Header lines are formatted first (as Lua strings), so no Lua error can
   * happen while the curl_slist is allocated. */
  lua_newtable(L);
  hdr_tab = lua_gettop(L);
  lua_getfield(L, 2, "headers");
  if (!lua_isnil(L, -1)) {
    luaL_checktype(L, -1, LUA_TTABLE);
    lua_pushnil(L);
    while (lua_next(L, -2) != 0) {
      if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TSTRING)
        return luaL_error(L, "request headers must be {name = string}");
      if (strpbrk(lua_tostring(L, -1), "\r\n") || strpbrk(lua_tostring(L, -2), "\r\n:"))
        return luaL_error(L, "request header '%s' contains a line break or colon", lua_tostring(L, -2));
      lua_pushfstring(L, "%s: %s", lua_tostring(L, -2), lua_tostring(L, -1));
      lua_rawseti(L, hdr_tab, ++nh);
      lua_pop(L, 1);
    }
  }
  lua_pop(L, 1);
  lua_pushliteral(L, "Expect:");            /* no 100-continue round trip */
  lua_rawseti(L, hdr_tab, ++nh);

  slist_free_cleansed(h->slist);
  h->slist = NULL;
  for (i = 1; i <= nh; i++) {
    struct curl_slist *nl;
    lua_rawgeti(L, hdr_tab, i);
    nl = curl_slist_append(h->slist, lua_tostring(L, -1));
    lua_pop(L, 1);
    if (nl == NULL) { bad = "out of memory building headers"; goto fail; }
    h->slist = nl;
  }
  h->body.len = 0; h->body.overflow = 0;
  h->hdrs.len = 0; h->hdrs.overflow = 0;
  h->hdrs.limit = 256 * 1024;
  h->errbuf[0] = '\0';

  if (curl_easy_setopt(h->curl, CURLOPT_URL, url) != CURLE_OK ||
      curl_easy_setopt(h->curl, CURLOPT_HTTPHEADER, h->slist) != CURLE_OK ||
      curl_easy_setopt(h->curl, CURLOPT_TIMEOUT_MS, timeout_ms) != CURLE_OK ||
      curl_easy_setopt(h->curl, CURLOPT_CONNECTTIMEOUT_MS, h->connect_timeout_ms) != CURLE_OK ||
      curl_easy_setopt(h->curl, CURLOPT_CUSTOMREQUEST, NULL) != CURLE_OK) {
    bad = "libcurl rejected an option"; goto fail;
  }
  if (strcmp(method, "GET") == 0 && body == NULL) {
    if (curl_easy_setopt(h->curl, CURLOPT_HTTPGET, 1L) != CURLE_OK) { bad = "libcurl rejected GET"; goto fail; }
  } else {
    if (curl_easy_setopt(h->curl, CURLOPT_POST, 1L) != CURLE_OK ||
        curl_easy_setopt(h->curl, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)bodylen) != CURLE_OK ||
        curl_easy_setopt(h->curl, CURLOPT_POSTFIELDS, body ? body : "") != CURLE_OK ||
        (strcmp(method, "POST") != 0 && curl_easy_setopt(h->curl, CURLOPT_CUSTOMREQUEST, method) != CURLE_OK)) {
      bad = "libcurl rejected the request body"; goto fail;
    }
  }

  rc = curl_easy_perform(h->curl);
  slist_free_cleansed(h->slist);
  h->slist = NULL;
  curl_easy_setopt(h->curl, CURLOPT_HTTPHEADER, (struct curl_slist *)NULL);
  curl_easy_setopt(h->curl, CURLOPT_POSTFIELDS, (char *)NULL);
  curl_easy_getinfo(h->curl, CURLINFO_REQUEST_SIZE, &reqsize);
  curl_easy_getinfo(h->curl, CURLINFO_NUM_CONNECTS, &nconn);
  if (rc != CURLE_OK) {
    const char *kind = curl_kind(rc, h->body.overflow);
    enos_push_errtable(L, kind, NULL);
    if (h->body.overflow)
      lua_pushfstring(L, "reply body exceeds the %d-byte limit", (int)h->body.limit);
    else
      lua_pushfstring(L, "%s (curl %d)", h->errbuf[0] ? h->errbuf : curl_easy_strerror(rc), (int)rc);
    lua_setfield(L, -2, "message");
    lua_pushinteger(L, (lua_Integer)rc);
    lua_setfield(L, -2, "curl_code");
    lua_pushboolean(L, reqsize > 0);
    lua_setfield(L, -2, "request_sent");
    return 2;
  }
  curl_easy_getinfo(h->curl, CURLINFO_RESPONSE_CODE, &status);
  curl_easy_getinfo(h->curl, CURLINFO_TOTAL_TIME, &total);
  lua_createtable(L, 0, 5);
  lua_pushinteger(L, (lua_Integer)status);
  lua_setfield(L, -2, "status");
  lua_pushlstring(L, h->body.data ? h->body.data : "", h->body.len);
  lua_setfield(L, -2, "body");
  enos_push_headers(L, h->hdrs.data ? h->hdrs.data : "", h->hdrs.len);
  lua_setfield(L, -2, "headers");
  lua_pushinteger(L, (lua_Integer)nconn);
  lua_setfield(L, -2, "new_connections");
  lua_pushnumber(L, total);
  lua_setfield(L, -2, "elapsed");
  return 1;
fail:
  slist_free_cleansed(h->slist);
  h->slist = NULL;
  return luaL_error(L, "enos: %s", bad);
}

static int easy_close(lua_State *L) {
  enos_easy *h = luaL_checkudata(L, 1, ENOS_EASY_MT);
  if (h->curl != NULL) {
    curl_easy_cleanup(h->curl);
    h->curl = NULL;
  }
  slist_free_cleansed(h->slist);
  h->slist = NULL;
  enos_buf_free(&h->body);
  enos_buf_free(&h->hdrs);
  return 0;
}

static int easy_tostring(lua_State *L) {
  enos_easy *h = luaL_checkudata(L, 1, ENOS_EASY_MT);
  lua_pushstring(L, h->curl ? "enos.easy (libcurl)" : "enos.easy (closed)");
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
