/* The concurrent transport: libcurl's multi interface. Lua adds prepared
 * requests and waits for completions; a coroutine scheduler in Lua resumes the
 * caller whose transfer finished (design.md). Transfers are pooled and the
 * multi handle's connection cache keeps connections alive (HTTP/2 multiplexed
 * where the server speaks it). */
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <unistd.h>
#include <fcntl.h>
#include "http.h"
#include "worker.h"

typedef struct xnode {
  enos_xfer x;
  lua_Integer id;
  struct xnode *next;          /* free list */
} xnode;

typedef struct {
  CURLM *multi;
  enos_http_opts o;
  xnode **all;                 /* every node, for cleanup */
  size_t nall, capall;
  xnode *free_list;
  lua_Integer next_id;
  int running;                 /* transfers added and not yet collected */
  int jobs;                    /* worker jobs submitted and not yet collected */
  enos_worker worker;          /* decryption and fsync off the event loop */
  int open;
} enos_multi;

static enos_multi *check_multi(lua_State *L, int idx) {
  enos_multi *m = luaL_checkudata(L, idx, ENOS_MULTI_MT);
  if (!m->open) luaL_argerror(L, idx, "multi transport is closed");
  return m;
}

/* multi{timeout=, connect_timeout=, cafile=, capath=, verify_tls=, user_agent=, max_body=, max_connections=} */
static int l_multi(lua_State *L) {
  enos_multi *m;
  lua_Integer maxconn = 64;
  if (lua_isnoneornil(L, 1)) { lua_settop(L, 0); lua_newtable(L); }
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_getfield(L, 1, "max_connections");
  if (!lua_isnil(L, -1)) maxconn = luaL_checkinteger(L, -1);
  lua_pop(L, 1);
  if (maxconn < 1 || maxconn > 10000) luaL_error(L, "option 'max_connections' must be 1..10000");
  m = lua_newuserdata(L, sizeof *m);
  memset(m, 0, sizeof *m);
  luaL_getmetatable(L, ENOS_MULTI_MT);
  lua_setmetatable(L, -2);
  enos_http_opts_read(L, 1, &m->o);
  m->open = 1;
  m->multi = curl_multi_init();
  if (m->multi == NULL) return luaL_error(L, "enos: curl_multi_init failed");
  if (curl_multi_setopt(m->multi, CURLMOPT_MAXCONNECTS, (long)maxconn) != CURLM_OK ||
      curl_multi_setopt(m->multi, CURLMOPT_PIPELINING, (long)CURLPIPE_MULTIPLEX) != CURLM_OK)
    return luaL_error(L, "enos: libcurl rejected a multi option");
  {
    const char *bad = enos_worker_init(&m->worker, m->multi);
    if (bad) return luaL_error(L, "enos: %s", bad);
  }
  return 1;
}

static xnode *get_node(enos_multi *m, const char **bad) {
  xnode *n;
  if (m->free_list) {
    n = m->free_list;
    m->free_list = n->next;
    return n;
  }
  if (m->nall == m->capall) {
    size_t cap = m->capall ? m->capall * 2 : 16;
    xnode **na = realloc(m->all, cap * sizeof *na);
    if (na == NULL) { *bad = "out of memory"; return NULL; }
    m->all = na;
    m->capall = cap;
  }
  n = malloc(sizeof *n);
  if (n == NULL) { *bad = "out of memory"; return NULL; }
  *bad = enos_xfer_init(&n->x, &m->o);
  if (*bad) { enos_xfer_free(&n->x); free(n); return NULL; }
  n->next = NULL;
  m->all[m->nall++] = n;
  return n;
}

static void put_node(enos_multi *m, xnode *n) {
  n->next = m->free_list;
  m->free_list = n;
}

/* m:add(req) -> id. The body is copied, so req may be collected. */
static int multi_add(lua_State *L) {
  enos_multi *m = check_multi(L, 1);
  const char *bad = NULL;
  xnode *n;
  luaL_checktype(L, 2, LUA_TTABLE);
  n = get_node(m, &bad);
  if (n == NULL) return luaL_error(L, "enos: %s", bad);
  /* enos_xfer_prepare may raise on misuse: return the node first so it is not lost. */
  put_node(m, n);
  bad = enos_xfer_prepare(L, 2, &n->x, &m->o, 1);
  m->free_list = n->next;                    /* take it back */
  if (bad) { put_node(m, n); return luaL_error(L, "enos: %s", bad); }
  n->id = ++m->next_id;
  if (curl_multi_add_handle(m->multi, n->x.curl) != CURLM_OK) {
    put_node(m, n);
    return luaL_error(L, "enos: curl_multi_add_handle failed");
  }
  m->running++;
  lua_pushinteger(L, n->id);
  return 1;
}

/* A job with nothing to release yet; NULL when out of memory (the caller frees what it holds). */
static enos_job *new_job(int kind) {
  enos_job *j = calloc(1, sizeof *j);
  if (j == NULL) return NULL;
  j->kind = kind;
  j->fd = -1;
  return j;
}

static int submit(lua_State *L, enos_multi *m, enos_job *j) {
  const char *bad;
  j->id = ++m->next_id;
  bad = enos_worker_submit(&m->worker, j);
  if (bad) { enos_job_free(j); return luaL_error(L, "enos: %s", bad); }
  m->jobs++;
  lua_pushinteger(L, j->id);
  return 1;
}

/* m:decrypt(key, sessionKey, deviceSecret, pad, mode, kf, enc) -> id: core.decrypt_secret in the
 * worker thread; its completion comes from wait() as {id=, res=plaintext} or {id=, err={kind="decrypt"}}. */
static int multi_decrypt(lua_State *L) {
  enos_multi *m = check_multi(L, 1);
  enos_decrypt_args a;
  enos_job *j;
  memset(&a, 0, sizeof a);
  enos_decrypt_read_args(L, 2, &a);          /* raises before anything is allocated */
  j = new_job(ENOS_JOB_DECRYPT);
  if (j == NULL) { enos_decrypt_args_free(&a); return luaL_error(L, "enos: out of memory"); }
  j->d = a;
  return submit(L, m, j);
}

/* m:fsync(file) -> id: fsync of an enos.file in the worker thread (on a dup of its descriptor,
 * so closing the file meanwhile is safe); completes as {id=, res=true} or {id=, err={kind="io"}}. */
static int multi_fsync(lua_State *L) {
  enos_multi *m = check_multi(L, 1);
  int fd = enos_file_fd(L, 2);
  enos_job *j = new_job(ENOS_JOB_FSYNC);
  if (j == NULL) return luaL_error(L, "enos: out of memory");
  j->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (j->fd < 0) {
    int e = errno;
    enos_job_free(j);
    return luaL_error(L, "enos: cannot duplicate the file descriptor: %s", strerror(e));
  }
  return submit(L, m, j);
}

/* Appends the finished worker jobs to the completion list on top of the stack. */
static int push_jobs(lua_State *L, enos_multi *m, int i) {
  enos_job *j = enos_worker_take(&m->worker);
  while (j) {
    enos_job *next = j->next;
    m->jobs--;
    lua_createtable(L, 0, 2);
    lua_pushinteger(L, j->id);
    lua_setfield(L, -2, "id");
    if (j->err) {
      enos_push_errtable(L, j->kind == ENOS_JOB_DECRYPT ? "decrypt" : "io", NULL);
      lua_remove(L, -2);                       /* the nil it pushes first */
      if (j->sys_errno) lua_pushfstring(L, "%s: %s", j->err, strerror(j->sys_errno));
      else lua_pushstring(L, j->err);
      lua_setfield(L, -2, "message");
      lua_setfield(L, -2, "err");
    } else if (j->kind == ENOS_JOB_DECRYPT) {
      lua_pushlstring(L, (const char *)j->out, j->outn);
      lua_setfield(L, -2, "res");
    } else {
      lua_pushboolean(L, 1);
      lua_setfield(L, -2, "res");
    }
    enos_job_free(j);                          /* cleanses the plaintext */
    lua_rawseti(L, -2, ++i);
    j = next;
  }
  return i;
}

/* m:wait(timeout_s) -> {{id=, res=}|{id=, err=}, …} (possibly empty).
 * Drives transfers and waits up to timeout_s for activity. */
static int multi_wait(lua_State *L) {
  enos_multi *m = check_multi(L, 1);
  lua_Number t = luaL_optnumber(L, 2, 1.0);
  int still = 0, nmsg = 0, i = 0;
  CURLMsg *msg;
  if (t < 0) t = 0;
  if (t > 3600) t = 3600;
  if (curl_multi_perform(m->multi, &still) != CURLM_OK) return luaL_error(L, "enos: curl_multi_perform failed");
  if (still == m->running && !enos_worker_has_done(&m->worker)) {
    /* nothing finished yet: sleep in poll until there is activity or the
     * timeout (with nothing in flight this is a plain sleep) */
    if (curl_multi_poll(m->multi, NULL, 0, (int)(t * 1000), NULL) != CURLM_OK)
      return luaL_error(L, "enos: curl_multi_poll failed");
    if (curl_multi_perform(m->multi, &still) != CURLM_OK) return luaL_error(L, "enos: curl_multi_perform failed");
  }
  lua_newtable(L);
  while ((msg = curl_multi_info_read(m->multi, &nmsg)) != NULL) {
    xnode *n = NULL;
    CURLcode rc;
    int nret;
    if (msg->msg != CURLMSG_DONE) continue;
    rc = msg->data.result;
    curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&n);
    curl_multi_remove_handle(m->multi, msg->easy_handle);
    m->running--;
    if (n == NULL) continue;
    lua_createtable(L, 0, 2);
    lua_pushinteger(L, n->id);
    lua_setfield(L, -2, "id");
    nret = enos_xfer_finish(L, &n->x, rc);
    if (nret == 1) {
      lua_setfield(L, -2, "res");
    } else {
      lua_setfield(L, -3, "err");
      lua_pop(L, 1);                         /* the nil */
    }
    put_node(m, n);
    lua_rawseti(L, -2, ++i);
  }
  if (m->jobs > 0) push_jobs(L, m, i);
  return 1;
}

/* m:pending() -> number of transfers added and not yet collected */
static int multi_pending(lua_State *L) {
  enos_multi *m = check_multi(L, 1);
  lua_pushinteger(L, m->running + m->jobs);
  return 1;
}

static int multi_close(lua_State *L) {
  enos_multi *m = luaL_checkudata(L, 1, ENOS_MULTI_MT);
  size_t i;
  if (!m->open) return 0;
  enos_worker_close(&m->worker);              /* joined before the multi handle it wakes goes */
  m->jobs = 0;
  for (i = 0; i < m->nall; i++) {
    if (m->multi) curl_multi_remove_handle(m->multi, m->all[i]->x.curl);
    enos_xfer_free(&m->all[i]->x);
    free(m->all[i]);
  }
  free(m->all);
  m->all = NULL;
  m->nall = m->capall = 0;
  m->free_list = NULL;
  if (m->multi) curl_multi_cleanup(m->multi);
  m->multi = NULL;
  enos_http_opts_free(&m->o);
  m->running = 0;
  m->open = 0;
  return 0;
}

static int multi_tostring(lua_State *L) {
  enos_multi *m = luaL_checkudata(L, 1, ENOS_MULTI_MT);
  if (m->open) lua_pushfstring(L, "enos.multi (libcurl, %d in flight)", m->running);
  else lua_pushstring(L, "enos.multi (closed)");
  return 1;
}

static const luaL_Reg multi_methods[] = {
  {"add", multi_add},
  {"wait", multi_wait},
  {"pending", multi_pending},
  {"decrypt", multi_decrypt},
  {"fsync", multi_fsync},
  {"close", multi_close},
  {NULL, NULL}
};

static const luaL_Reg multi_funcs[] = {
  {"multi", l_multi},
  {NULL, NULL}
};

void enos_open_multi(lua_State *L) {
  luaL_newmetatable(L, ENOS_MULTI_MT);
  lua_pushcfunction(L, multi_close);
  lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, multi_close);
  lua_setfield(L, -2, "__close");
  lua_pushcfunction(L, multi_tostring);
  lua_setfield(L, -2, "__tostring");
  luaL_newlib(L, multi_methods);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
  luaL_setfuncs(L, multi_funcs, 0);
}
