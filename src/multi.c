/* The concurrent transport: libcurl's multi interface. Lua adds prepared
 * requests and waits for completions; a coroutine scheduler in Lua resumes the
 * caller whose transfer finished (docs/design.md). Transfers are pooled and the
 * multi handle's connection cache keeps connections alive (HTTP/2 multiplexed
 * where the server speaks it).
 *
 * On Linux the loop is event-driven: libcurl's socket API (curl_multi_socket_action)
 * over an epoll set, so a wake-up costs what is ready, not what is in flight
 * (curl_multi_perform visits every transfer and polls each one's socket: at 64
 * transfers in flight that is 64 system calls for one reply). The worker thread
 * wakes the loop through an eventfd in the same set. Elsewhere (or built with
 * -DENOS_NO_EPOLL, as make check does to test it): perform + poll. */
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <unistd.h>
#include <fcntl.h>
#include <time.h>
#include "http.h"
#include "worker.h"
#include "file.h"
#if defined(__linux__) && !defined(ENOS_NO_EPOLL)
#define ENOS_EPOLL 1
#include <sys/epoll.h>
#include <sys/eventfd.h>
#endif

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
#ifdef ENOS_EPOLL
  int ep, evfd;                /* the epoll set (libcurl's sockets + evfd); the worker's eventfd */
  double deadline;             /* when libcurl's timer expires (monotonic ms), or < 0: none */
  int sock_err;                /* an epoll_ctl failed in the socket callback (errno) */
#endif
} enos_multi;

#ifdef ENOS_EPOLL
/* CURLMOPT_SOCKETFUNCTION: watch fd for what libcurl waits on. A socket libcurl has not seen
 * before (sockp NULL, reset when it removes one) is added to the set, then marked. */
static int on_socket(CURL *e, curl_socket_t fd, int what, void *ud, void *sockp) {
  enos_multi *m = ud;
  struct epoll_event ev;
  int op = sockp ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;
  (void)e;
  if (m->ep < 0) return 0;
  if (what == CURL_POLL_REMOVE) {
    epoll_ctl(m->ep, EPOLL_CTL_DEL, fd, NULL);   /* (ENOENT/EBADF: already gone with the socket) */
    return 0;
  }
  memset(&ev, 0, sizeof ev);
  ev.events = (what & CURL_POLL_IN ? EPOLLIN : 0u) | (what & CURL_POLL_OUT ? EPOLLOUT : 0u);
  ev.data.fd = fd;
  if (epoll_ctl(m->ep, op, fd, &ev) != 0) {
    /* the set and libcurl disagree (a descriptor number reused): the other operation fixes it */
    int other = op == EPOLL_CTL_ADD ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;
    if ((errno != EEXIST && errno != ENOENT) || epoll_ctl(m->ep, other, fd, &ev) != 0) {
      m->sock_err = errno;
      return -1;
    }
  }
  if (!sockp) curl_multi_assign(m->multi, fd, m);
  return 0;
}

/* CURLMOPT_TIMERFUNCTION: libcurl wants socket_action(TIMEOUT) in ms milliseconds (-1: never). */
static int on_timer(CURLM *multi, long ms, void *ud) {
  enos_multi *m = ud;
  (void)multi;
  m->deadline = ms < 0 ? -1.0 : enos_monotonic_ms() + (double)ms;
  return 0;
}

/* The worker's wake-up (its thread): one write to the eventfd; a pending count is never lost. */
static void wake_loop(void *ud) {
  enos_multi *m = ud;
  uint64_t one = 1;
  ssize_t r;
  do r = write(m->evfd, &one, sizeof one); while (r < 0 && errno == EINTR);
  /* (EAGAIN only when the counter is full: the loop is awake already) */
}
#else
static void wake_loop(void *ud) {
  enos_multi *m = ud;
  curl_multi_wakeup(m->multi);      /* thread-safe; wakes the next curl_multi_poll */
}
#endif

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
#ifdef ENOS_EPOLL
  m->evfd = -1;                     /* (closed by multi_close only when created) */
  m->deadline = -1.0;
  m->ep = epoll_create1(EPOLL_CLOEXEC);
  if (m->ep < 0) return luaL_error(L, "enos: epoll_create1 failed: %s", strerror(errno));
  m->evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (m->evfd < 0) return luaL_error(L, "enos: eventfd failed: %s", strerror(errno));
  {
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = EPOLLIN;
    ev.data.fd = m->evfd;
    if (epoll_ctl(m->ep, EPOLL_CTL_ADD, m->evfd, &ev) != 0)
      return luaL_error(L, "enos: epoll_ctl failed: %s", strerror(errno));
  }
#endif
  m->multi = curl_multi_init();
  if (m->multi == NULL) return luaL_error(L, "enos: curl_multi_init failed");
  if (curl_multi_setopt(m->multi, CURLMOPT_MAXCONNECTS, (long)maxconn) != CURLM_OK ||
      curl_multi_setopt(m->multi, CURLMOPT_PIPELINING, (long)CURLPIPE_MULTIPLEX) != CURLM_OK)
    return luaL_error(L, "enos: libcurl rejected a multi option");
#ifdef ENOS_EPOLL
  if (curl_multi_setopt(m->multi, CURLMOPT_SOCKETFUNCTION, on_socket) != CURLM_OK ||
      curl_multi_setopt(m->multi, CURLMOPT_SOCKETDATA, m) != CURLM_OK ||
      curl_multi_setopt(m->multi, CURLMOPT_TIMERFUNCTION, on_timer) != CURLM_OK ||
      curl_multi_setopt(m->multi, CURLMOPT_TIMERDATA, m) != CURLM_OK)
    return luaL_error(L, "enos: libcurl rejected a multi option");
#endif
  {
    const char *bad = enos_worker_init(&m->worker, wake_loop, m);
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

#ifdef ENOS_EPOLL
/* Runs libcurl's timer when it is due. libcurl calls on_timer only when its earliest expiry
 * changes; a timer that fired a little early (it reports whole milliseconds, truncated) leaves
 * that expiry as it was and calls nothing: the timer is then re-armed from curl_multi_timeout,
 * or that transfer would wait for some other event. */
static int run_timer(enos_multi *m) {
  int still;
  long ms = -1;
  if (m->deadline < 0 || enos_monotonic_ms() < m->deadline) return 1;
  m->deadline = -1.0;
  if (curl_multi_socket_action(m->multi, CURL_SOCKET_TIMEOUT, 0, &still) != CURLM_OK) return 0;
  if (m->deadline < 0) {
    if (curl_multi_timeout(m->multi, &ms) != CURLM_OK) return 0;
    if (ms >= 0) m->deadline = enos_monotonic_ms() + (double)ms;
  }
  return 1;
}

/* epoll_wait for up to `ms` milliseconds, to the microsecond where the system allows (epoll_pwait2,
 * Linux 5.11, glibc 2.35): a batch's group commit paces its fsyncs in milliseconds, and a wait
 * rounded up to the next whole millisecond delays every row that waits on its journal record. */
static int wait_events(enos_multi *m, struct epoll_event *evs, int max, double ms) {
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 35))
  static int no_pwait2 = 0;
  if (!no_pwait2) {
    struct timespec ts;
    int n;
    double us = ms * 1000.0;
    ts.tv_sec = (time_t)(us / 1e6);
    ts.tv_nsec = (long)((us - (double)ts.tv_sec * 1e6) * 1000.0);
    n = epoll_pwait2(m->ep, evs, max, &ts, NULL);
    if (n >= 0 || errno != ENOSYS) return n;
    no_pwait2 = 1;                           /* an older kernel: whole milliseconds below */
  }
#endif
  return epoll_wait(m->ep, evs, max, (int)(ms + 0.999));
}

/* Waits up to t seconds (less when libcurl's timer is due sooner) for a socket, the worker or the
 * timer, and lets libcurl act on what is ready. 0 on a libcurl failure. */
static int drive(enos_multi *m, lua_Number t) {
  struct epoll_event evs[128];
  int n, i, still;
  double wait = t * 1000.0;                  /* ms */
  if (m->deadline >= 0) {
    double left = m->deadline - enos_monotonic_ms();
    if (left < wait) wait = left <= 0 ? 0 : left;
  }
  n = wait_events(m, evs, (int)(sizeof evs / sizeof evs[0]), wait);
  for (i = 0; i < n; i++) {
    int fd = evs[i].data.fd, flags = 0;
    if (fd == m->evfd) {
      uint64_t v;
      ssize_t r = read(m->evfd, &v, sizeof v);       /* resets the counter; the jobs are collected below */
      (void)r;
      continue;
    }
    if (evs[i].events & EPOLLIN) flags |= CURL_CSELECT_IN;
    if (evs[i].events & EPOLLOUT) flags |= CURL_CSELECT_OUT;
    if (evs[i].events & (EPOLLERR | EPOLLHUP)) flags |= CURL_CSELECT_ERR;
    if (curl_multi_socket_action(m->multi, fd, flags, &still) != CURLM_OK) return 0;
  }
  return run_timer(m);
}
#endif

/* Pushes the finished transfers (libcurl's messages) onto the completion list on top of the stack. */
static int push_transfers(lua_State *L, enos_multi *m, int i) {
  CURLMsg *msg;
  int nmsg = 0;
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
  return i;
}

/* m:wait(timeout_s) -> {{id=, res=}|{id=, err=}, …} (possibly empty).
 * Drives transfers and waits up to timeout_s for activity. */
static int multi_wait(lua_State *L) {
  enos_multi *m = check_multi(L, 1);
  lua_Number t = luaL_optnumber(L, 2, 1.0);
  int i = 0;
  if (t < 0) t = 0;
  if (t > 3600) t = 3600;
#ifdef ENOS_EPOLL
  /* what is due or ready now; then, when nothing has finished, sleep until something happens */
  m->sock_err = 0;
  if (!run_timer(m) || !drive(m, 0)) return luaL_error(L, "enos: curl_multi_socket_action failed");
  lua_newtable(L);
  i = push_transfers(L, m, 0);
  if (i == 0 && t > 0 && !enos_worker_has_done(&m->worker)) {
    if (!drive(m, t)) return luaL_error(L, "enos: curl_multi_socket_action failed");
    i = push_transfers(L, m, 0);
  }
  if (m->sock_err) return luaL_error(L, "enos: epoll_ctl failed: %s", strerror(m->sock_err));
#else
  {
    int still = 0;
    if (curl_multi_perform(m->multi, &still) != CURLM_OK) return luaL_error(L, "enos: curl_multi_perform failed");
    if (still == m->running && !enos_worker_has_done(&m->worker)) {
      /* nothing finished yet: sleep in poll until there is activity or the
       * timeout (with nothing in flight this is a plain sleep) */
      if (curl_multi_poll(m->multi, NULL, 0, (int)(t * 1000), NULL) != CURLM_OK)
        return luaL_error(L, "enos: curl_multi_poll failed");
      if (curl_multi_perform(m->multi, &still) != CURLM_OK) return luaL_error(L, "enos: curl_multi_perform failed");
    }
    lua_newtable(L);
    i = push_transfers(L, m, 0);
  }
#endif
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
#ifdef ENOS_EPOLL
  if (m->ep >= 0) close(m->ep);
  if (m->evfd >= 0) close(m->evfd);
  m->ep = m->evfd = -1;
#endif
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
