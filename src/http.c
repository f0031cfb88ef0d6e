/* Shared libcurl plumbing: options, request setup, reply collection, errors. */
#include <stdlib.h>
#include <string.h>
#include <ctype.h>
#include "http.h"

#define DEFAULT_MAX_BODY (8u * 1024u * 1024u)

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
    if (raw[i] == ' ' || raw[i] == '\t') { i = end + 1; continue; }   /* obsolete line folding: ignored */
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

/* A reply's `headers` are parsed on first use (most replies never need them):
 * the reply table keeps the raw block and this __index builds the table once. */
#define ENOS_RES_MT "enos.response"

static int l_res_index(lua_State *L) {
  size_t len = 0;
  const char *raw;
  if (lua_type(L, 2) != LUA_TSTRING || strcmp(lua_tostring(L, 2), "headers") != 0) return 0;
  lua_getfield(L, 1, "raw_headers");
  raw = lua_tolstring(L, -1, &len);
  enos_push_headers(L, raw ? raw : "", raw ? len : 0);
  lua_pushvalue(L, -1);
  lua_setfield(L, 1, "headers");              /* rawset: the table has no __newindex */
  return 1;
}

void enos_open_http(lua_State *L) {
  if (luaL_newmetatable(L, ENOS_RES_MT)) {
    lua_pushcfunction(L, l_res_index);
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1);
}

/* ---- options --------------------------------------------------------------- */

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
  lua_pop(L, 1);                              /* still referenced by the table */
  return v;
}

static char *dup_or_null(const char *s, int *failed) {
  char *d;
  if (s == NULL) return NULL;
  d = malloc(strlen(s) + 1);
  if (d == NULL) { *failed = 1; return NULL; }
  memcpy(d, s, strlen(s) + 1);
  return d;
}

void enos_http_opts_read(lua_State *L, int idx, enos_http_opts *o) {
  const char *cafile, *capath, *ua;
  lua_Number max_body = DEFAULT_MAX_BODY;
  int failed = 0;
  memset(o, 0, sizeof *o);
  luaL_checktype(L, idx, LUA_TTABLE);
  cafile = opt_str(L, idx, "cafile");
  capath = opt_str(L, idx, "capath");
  ua = opt_str(L, idx, "user_agent");
  o->timeout_ms = opt_ms(L, idx, "timeout", 30000);
  o->connect_timeout_ms = opt_ms(L, idx, "connect_timeout", 10000);
  lua_getfield(L, idx, "verify_tls");
  o->verify = lua_isnil(L, -1) ? 1 : lua_toboolean(L, -1);
  lua_pop(L, 1);
  lua_getfield(L, idx, "max_body");
  if (!lua_isnil(L, -1)) max_body = luaL_checknumber(L, -1);
  lua_pop(L, 1);
  if (!(max_body >= 1024) || max_body > 1024.0 * 1024 * 1024) luaL_error(L, "option 'max_body' must be 1 KiB .. 1 GiB");
  o->max_body = (size_t)max_body;
  /* All Lua calls are done; now the copies. */
  o->cafile = dup_or_null(cafile, &failed);
  o->capath = dup_or_null(capath, &failed);
  o->user_agent = dup_or_null(ua, &failed);
  if (failed) {
    enos_http_opts_free(o);
    luaL_error(L, "enos: out of memory");
  }
}

void enos_http_opts_free(enos_http_opts *o) {
  free(o->cafile);
  free(o->capath);
  free(o->user_agent);
  o->cafile = o->capath = o->user_agent = NULL;
}

/* ---- callbacks ------------------------------------------------------------- */

static size_t on_body(char *p, size_t size, size_t nmemb, void *ud) {
  enos_buf *b = ud;
  size_t n = size * nmemb;
  return enos_buf_append(b, p, n) ? n : 0;
}

/* A request marked `once` must never be sent twice: libcurl silently re-sends a
 * request whose reused connection died before any reply, which for a replace
 * the server applied would apply it again. libcurl calls the pre-request
 * callback before every attempt: the second attempt of a `once` request is
 * aborted there (and reported as possibly applied). */
#if LIBCURL_VERSION_NUM < 0x075000
#error "enos needs libcurl >= 7.80 (CURLOPT_PREREQFUNCTION)"
#endif
static int on_prereq(void *ud, char *primary_ip, char *local_ip, int primary_port, int local_port) {
  enos_xfer *x = ud;
  (void)primary_ip; (void)local_ip; (void)primary_port; (void)local_port;
  x->attempts++;
  if (x->once && x->attempts > 1) {
    x->refused_resend = 1;
    return CURL_PREREQFUNC_ABORT;
  }
  return CURL_PREREQFUNC_OK;
}

static size_t on_header(char *p, size_t size, size_t nmemb, void *ud) {
  enos_buf *b = ud;
  size_t n = size * nmemb;
  if (n >= 5 && memcmp(p, "HTTP/", 5) == 0) b->len = 0;   /* a new response (e.g. after 100) */
  return enos_buf_append(b, p, n) ? n : 0;
}

/* ---- transfers ------------------------------------------------------------- */

#define SETOPT(o, v) do { if (curl_easy_setopt(x->curl, o, v) != CURLE_OK) return #o; } while (0)

const char *enos_xfer_init(enos_xfer *x, const enos_http_opts *o) {
  memset(x, 0, sizeof *x);
  x->curl = curl_easy_init();
  if (x->curl == NULL) return "curl_easy_init";
  x->body.limit = o->max_body;
  x->hdrs.limit = 256 * 1024;
  SETOPT(CURLOPT_NOSIGNAL, 1L);
  SETOPT(CURLOPT_FOLLOWLOCATION, 0L);
#if LIBCURL_VERSION_NUM >= 0x075500
  SETOPT(CURLOPT_PROTOCOLS_STR, "http,https");
#else
  SETOPT(CURLOPT_PROTOCOLS, (long)(CURLPROTO_HTTP | CURLPROTO_HTTPS));
#endif
  SETOPT(CURLOPT_SSL_VERIFYPEER, o->verify ? 1L : 0L);
  SETOPT(CURLOPT_SSL_VERIFYHOST, o->verify ? 2L : 0L);
  SETOPT(CURLOPT_SSLVERSION, (long)CURL_SSLVERSION_TLSv1_2);
  if (o->cafile) SETOPT(CURLOPT_CAINFO, o->cafile);
  if (o->capath) SETOPT(CURLOPT_CAPATH, o->capath);
  SETOPT(CURLOPT_USERAGENT, o->user_agent ? o->user_agent : "enos/" ENOS_VERSION);
  SETOPT(CURLOPT_TCP_KEEPALIVE, 1L);
  SETOPT(CURLOPT_CONNECTTIMEOUT_MS, o->connect_timeout_ms);
  SETOPT(CURLOPT_ERRORBUFFER, x->errbuf);
  SETOPT(CURLOPT_WRITEFUNCTION, on_body);
  SETOPT(CURLOPT_WRITEDATA, &x->body);
  SETOPT(CURLOPT_HEADERFUNCTION, on_header);
  SETOPT(CURLOPT_HEADERDATA, &x->hdrs);
  SETOPT(CURLOPT_PREREQFUNCTION, on_prereq);
  SETOPT(CURLOPT_PREREQDATA, (void *)x);
  SETOPT(CURLOPT_PRIVATE, (void *)x);
  return NULL;
}

void enos_xfer_free(enos_xfer *x) {
  if (x->curl) curl_easy_cleanup(x->curl);
  x->curl = NULL;
  slist_free_cleansed(x->slist);
  x->slist = NULL;
  enos_buf_free(&x->body);
  enos_buf_free(&x->hdrs);
}

const char *enos_xfer_prepare(lua_State *L, int idx, enos_xfer *x, const enos_http_opts *o, int copy_body) {
  const char *method, *url, *body = NULL;
  size_t bodylen = 0;
  long timeout_ms;
  int once;

  idx = idx < 0 ? lua_gettop(L) + idx + 1 : idx;
  luaL_checktype(L, idx, LUA_TTABLE);
  url = opt_str(L, idx, "url");
  if (url == NULL) luaL_error(L, "request 'url' must be a string");
  method = opt_str(L, idx, "method");
  if (method == NULL) method = "GET";
  lua_getfield(L, idx, "body");
  if (!lua_isnil(L, -1)) {
    if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "request 'body' must be a string");
    body = lua_tolstring(L, -1, &bodylen);
  }
  lua_pop(L, 1);
  timeout_ms = opt_ms(L, idx, "timeout", o->timeout_ms);
  /* a request that must not be sent twice (see on_prereq) */
  lua_getfield(L, idx, "once");
  once = lua_toboolean(L, -1);
  lua_pop(L, 1);

  /* Header lines, checked and formatted in one pass. A misuse raises with the
   * list half built: it stays in x->slist, which the next prepare frees. */
  slist_free_cleansed(x->slist);
  x->slist = NULL;
  lua_getfield(L, idx, "headers");
  if (!lua_isnil(L, -1)) {
    char line[8200];
    luaL_checktype(L, -1, LUA_TTABLE);
    lua_pushnil(L);
    while (lua_next(L, -2) != 0) {
      struct curl_slist *nl;
      size_t kn = 0, vn = 0;
      const char *k, *v;
      int n;
      if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TSTRING)
        luaL_error(L, "request headers must be {name = string}");
      k = lua_tolstring(L, -2, &kn);
      v = lua_tolstring(L, -1, &vn);
      if (strpbrk(v, "\r\n") || strpbrk(k, "\r\n:"))
        luaL_error(L, "request header '%s' contains a line break or colon", k);
      if (kn + vn > 8000) luaL_error(L, "request header '%s' is too long", k);
      n = snprintf(line, sizeof line, "%s: %s", k, v);     /* fits: checked above */
      lua_pop(L, 1);
      nl = n > 0 ? curl_slist_append(x->slist, line) : NULL;
      if (n > 0) enos_cleanse(line, (size_t)n);            /* it held the token */
      if (nl == NULL) { lua_pop(L, 2); return "out of memory building headers"; }
      x->slist = nl;
    }
  }
  lua_pop(L, 1);                              /* headers */
  {
    /* no 100-continue round trip */
    struct curl_slist *nl = curl_slist_append(x->slist, "Expect:");
    if (nl == NULL) return "out of memory building headers";
    x->slist = nl;
  }
  x->body.len = 0; x->body.overflow = 0;
  x->hdrs.len = 0; x->hdrs.overflow = 0;
  x->errbuf[0] = '\0';
  x->once = once; x->attempts = 0; x->refused_resend = 0;

  if (curl_easy_setopt(x->curl, CURLOPT_URL, url) != CURLE_OK ||
      curl_easy_setopt(x->curl, CURLOPT_HTTPHEADER, x->slist) != CURLE_OK ||
      curl_easy_setopt(x->curl, CURLOPT_TIMEOUT_MS, timeout_ms) != CURLE_OK ||
      curl_easy_setopt(x->curl, CURLOPT_CUSTOMREQUEST, (char *)NULL) != CURLE_OK)
    return "libcurl rejected the URL or an option";
  if (strcmp(method, "GET") == 0 && body == NULL) {
    if (curl_easy_setopt(x->curl, CURLOPT_HTTPGET, 1L) != CURLE_OK) return "libcurl rejected GET";
  } else {
    if (curl_easy_setopt(x->curl, CURLOPT_POST, 1L) != CURLE_OK ||
        curl_easy_setopt(x->curl, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)bodylen) != CURLE_OK ||
        curl_easy_setopt(x->curl, copy_body ? CURLOPT_COPYPOSTFIELDS : CURLOPT_POSTFIELDS, body ? body : "") != CURLE_OK ||
        (strcmp(method, "POST") != 0 && curl_easy_setopt(x->curl, CURLOPT_CUSTOMREQUEST, method) != CURLE_OK))
      return "libcurl rejected the request body";
  }
  return NULL;
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

int enos_xfer_finish(lua_State *L, enos_xfer *x, CURLcode rc) {
  long status = 0, reqsize = 0, nconn = 0;
  double total = 0;
  slist_free_cleansed(x->slist);
  x->slist = NULL;
  curl_easy_setopt(x->curl, CURLOPT_HTTPHEADER, (struct curl_slist *)NULL);
  curl_easy_getinfo(x->curl, CURLINFO_REQUEST_SIZE, &reqsize);
  curl_easy_getinfo(x->curl, CURLINFO_NUM_CONNECTS, &nconn);
  if (rc == CURLE_ABORTED_BY_CALLBACK && x->refused_resend) {
    /* libcurl wanted to re-send a `once` request: it may have been applied */
    enos_push_errtable(L, "transport", NULL);
    lua_pushliteral(L, "the connection closed before any reply; the request may have been applied (not re-sent)");
    lua_setfield(L, -2, "message");
    lua_pushinteger(L, (lua_Integer)rc);
    lua_setfield(L, -2, "curl_code");
    lua_pushboolean(L, 1);
    lua_setfield(L, -2, "request_sent");
    return 2;
  }
  if (rc != CURLE_OK) {
    enos_push_errtable(L, curl_kind(rc, x->body.overflow), NULL);
    if (x->body.overflow)
      lua_pushfstring(L, "reply body exceeds the %d-byte limit", (int)x->body.limit);
    else
      lua_pushfstring(L, "%s (curl %d)", x->errbuf[0] ? x->errbuf : curl_easy_strerror(rc), (int)rc);
    lua_setfield(L, -2, "message");
    lua_pushinteger(L, (lua_Integer)rc);
    lua_setfield(L, -2, "curl_code");
    lua_pushboolean(L, reqsize > 0);
    lua_setfield(L, -2, "request_sent");
    return 2;
  }
  curl_easy_getinfo(x->curl, CURLINFO_RESPONSE_CODE, &status);
  curl_easy_getinfo(x->curl, CURLINFO_TOTAL_TIME, &total);
  lua_createtable(L, 0, 6);
  luaL_getmetatable(L, ENOS_RES_MT);
  lua_setmetatable(L, -2);
  lua_pushinteger(L, (lua_Integer)status);
  lua_setfield(L, -2, "status");
  lua_pushlstring(L, x->body.data ? x->body.data : "", x->body.len);
  lua_setfield(L, -2, "body");
  lua_pushlstring(L, x->hdrs.data ? x->hdrs.data : "", x->hdrs.len);
  lua_setfield(L, -2, "raw_headers");
  lua_pushinteger(L, (lua_Integer)nconn);
  lua_setfield(L, -2, "new_connections");
  lua_pushnumber(L, total);
  lua_setfield(L, -2, "elapsed");
  return 1;
}
