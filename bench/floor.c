/* The floor: the same signed calls as an enos batch row used to make (get, replaceDevice, get; or, with
 * FLOOR_ONE_CALL=1, one replaceDevice per device by productKey + deviceKey, what the batch now costs), written directly against libcurl multi and OpenSSL, N rows in flight.
 * usage: floor URL ACCESS_KEY SECRET_KEY ORG ROWS CONCURRENCY FIRST [perform|socket [SPIN_US]]
 * The loop: "perform" (default) is libcurl's plain multi loop, curl_multi_perform + curl_multi_poll;
 * "socket" is its event-driven API, curl_multi_socket_action over epoll (what enos.core.multi does).
 * SPIN_US (not used by make bench): CPU burnt per reply, a model of a client with more work per
 * call, to see how throughput on this shared machine follows the client's CPU per row.
 * Rows are productKey pk_demo, deviceKey OLD-%07d -> NEW-%07d, i = FIRST..FIRST+ROWS-1.
 * Prints one JSON line: rows, ok, elapsed_s, cpu_s. */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/resource.h>
#include <sys/epoll.h>
#include <curl/curl.h>
#include <openssl/evp.h>

typedef struct { char *p; size_t n, cap; } buf;
typedef struct {
  CURL *h; struct curl_slist *hdrs; buf body; int row, stage; char asset[64];
} slot;

static const char *URL, *AK, *SK, *ORG;
static char TOKEN[256];
static int ONE_CALL;          /* FLOOR_ONE_CALL=1: one replaceDevice per device */

static size_t on_data(char *p, size_t s, size_t n, void *u) {
  buf *b = u; size_t len = s * n;
  if (b->n + len + 1 > b->cap) {
    size_t cap = b->cap ? b->cap * 2 : 4096;
    while (cap < b->n + len + 1) cap *= 2;
    char *np = realloc(b->p, cap);
    if (!np) return 0;
    b->p = np; b->cap = cap;
  }
  memcpy(b->p + b->n, p, len); b->n += len; b->p[b->n] = 0;
  return len;
}

static void hex_sha256(const char *s, size_t n, char out[65]) {
  unsigned char md[32]; unsigned int l = 0;
  EVP_Digest(s, n, md, &l, EVP_sha256(), NULL);
  for (int i = 0; i < 32; i++) sprintf(out + 2 * i, "%02x", md[i]);
}

/* The socket loop's state: libcurl tells which sockets to watch and when its timer expires. */
static int EP = -1;
static long long DEADLINE = -1;

static long long mono_ms(void) {
  struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
  return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int on_socket(CURL *e, curl_socket_t fd, int what, void *u, void *sp) {
  struct epoll_event ev = {0};
  (void)e; (void)u; (void)sp;
  if (what == CURL_POLL_REMOVE) { epoll_ctl(EP, EPOLL_CTL_DEL, fd, NULL); return 0; }
  ev.events = (what & CURL_POLL_IN ? EPOLLIN : 0) | (what & CURL_POLL_OUT ? EPOLLOUT : 0);
  ev.data.fd = fd;
  if (epoll_ctl(EP, EPOLL_CTL_MOD, fd, &ev) != 0) epoll_ctl(EP, EPOLL_CTL_ADD, fd, &ev);
  return 0;
}

static int on_timer(CURLM *m, long ms, void *u) {
  (void)m; (void)u;
  DEADLINE = ms < 0 ? -1 : mono_ms() + ms;
  return 0;
}

/* One turn of the socket loop: wait for a socket or the timer, and let libcurl act on it. */
static void socket_turn(CURLM *m) {
  struct epoll_event evs[256];
  int running, n, i, wait = 1000;
  if (DEADLINE >= 0) { long long left = DEADLINE - mono_ms(); wait = left < 0 ? 0 : left < 1000 ? (int)left : 1000; }
  n = epoll_wait(EP, evs, 256, wait);
  for (i = 0; i < n; i++) {
    int f = (evs[i].events & EPOLLIN ? CURL_CSELECT_IN : 0) | (evs[i].events & EPOLLOUT ? CURL_CSELECT_OUT : 0) |
      (evs[i].events & (EPOLLERR | EPOLLHUP) ? CURL_CSELECT_ERR : 0);
    curl_multi_socket_action(m, evs[i].data.fd, f, &running);
  }
  if (DEADLINE >= 0 && mono_ms() >= DEADLINE) { DEADLINE = -1; curl_multi_socket_action(m, CURL_SOCKET_TIMEOUT, 0, &running); }
}

static long long now_ms(void) {
  struct timespec ts; clock_gettime(CLOCK_REALTIME, &ts);
  return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void get_token(void) {
  CURL *h = curl_easy_init(); buf b = {0};
  char body[512], enc_in[512], enc[65], url[512];
  long long ts = now_ms();
  snprintf(enc_in, sizeof enc_in, "%s%lld%s", AK, ts, SK);
  hex_sha256(enc_in, strlen(enc_in), enc);
  snprintf(body, sizeof body, "{\"appKey\":\"%s\",\"encryption\":\"%s\",\"timestamp\":%lld}", AK, enc, ts);
  snprintf(url, sizeof url, "%s/apim-token-service/v2.0/token/get", URL);
  struct curl_slist *hd = curl_slist_append(NULL, "Content-Type: application/json");
  curl_easy_setopt(h, CURLOPT_URL, url);
  curl_easy_setopt(h, CURLOPT_HTTPHEADER, hd);
  curl_easy_setopt(h, CURLOPT_POSTFIELDS, body);
  curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_data);
  curl_easy_setopt(h, CURLOPT_WRITEDATA, &b);
  if (curl_easy_perform(h) != CURLE_OK || !b.p) { fprintf(stderr, "token request failed\n"); exit(1); }
  char *t = strstr(b.p, "\"accessToken\":\"");
  if (!t) { fprintf(stderr, "no token: %s\n", b.p); exit(1); }
  t += 15;
  char *e = strchr(t, '"');
  snprintf(TOKEN, sizeof TOKEN, "%.*s", (int)(e - t), t);
  curl_slist_free_all(hd); curl_easy_cleanup(h); free(b.p);
}

/* Sets up the slot's handle for its current stage (0 get, 1 replace, 2 get). */
static void prepare(slot *s) {
  char q[512], url[1024], sig_in[2048], sig[65], hbuf[3][320], body[256] = "";
  char old[32], new_[32];
  long long ts = now_ms();
  snprintf(old, sizeof old, "OLD-%07d", s->row);
  snprintf(new_, sizeof new_, "NEW-%07d", s->row);
  const char *action = s->stage == 1 ? "replaceDevice" : "get";
  if (ONE_CALL) {
    /* one replace per device, by productKey + deviceKey (the compare-and-swap form enos sends) */
    snprintf(body, sizeof body, "{\"newDeviceKey\":\"%s\"}", new_);
    snprintf(q, sizeof q, "action=replaceDevice&orgId=%s&productKey=pk_demo&deviceKey=%s", ORG, old);
    snprintf(sig_in, sizeof sig_in, "%sactionreplaceDevice" "deviceKey%sorgId%sproductKeypk_demo%s%lld%s", TOKEN, old,
      ORG, body, ts, SK);
  } else if (s->stage == 0) {
    snprintf(q, sizeof q, "action=get&orgId=%s&productKey=pk_demo&deviceKey=%s", ORG, old);
    snprintf(sig_in, sizeof sig_in, "%sactionget" "deviceKey%sorgId%sproductKeypk_demo%lld%s", TOKEN, old, ORG, ts, SK);
  } else {
    /* by assetId, as the workflow does once the preflight knows it */
    snprintf(q, sizeof q, "action=%s&assetId=%s&orgId=%s", action, s->asset, ORG);
    if (s->stage == 1) snprintf(body, sizeof body, "{\"newDeviceKey\":\"%s\"}", new_);
    snprintf(sig_in, sizeof sig_in, "%saction%sassetId%sorgId%s%s%lld%s", TOKEN, action, s->asset, ORG, body, ts, SK);
  }
  hex_sha256(sig_in, strlen(sig_in), sig);
  snprintf(url, sizeof url, "%s/connect-service/v2.4/devices?%s", URL, q);
  snprintf(hbuf[0], sizeof hbuf[0], "apim-accesstoken: %s", TOKEN);
  snprintf(hbuf[1], sizeof hbuf[1], "apim-timestamp: %lld", ts);
  snprintf(hbuf[2], sizeof hbuf[2], "apim-signature: %s", sig);
  if (s->hdrs) curl_slist_free_all(s->hdrs);
  s->hdrs = NULL;
  for (int i = 0; i < 3; i++) s->hdrs = curl_slist_append(s->hdrs, hbuf[i]);
  s->hdrs = curl_slist_append(s->hdrs, "Content-Type: application/json;charset=UTF-8");
  s->hdrs = curl_slist_append(s->hdrs, "Expect:");
  s->body.n = 0;
  curl_easy_setopt(s->h, CURLOPT_URL, url);
  curl_easy_setopt(s->h, CURLOPT_HTTPHEADER, s->hdrs);
  if (s->stage == 1) {
    curl_easy_setopt(s->h, CURLOPT_COPYPOSTFIELDS, body);
  } else {
    curl_easy_setopt(s->h, CURLOPT_HTTPGET, 1L);
  }
}

int main(int argc, char **argv) {
  if (argc < 8) { fprintf(stderr, "usage: floor URL AK SK ORG ROWS CONCURRENCY FIRST\n"); return 2; }
  URL = argv[1]; AK = argv[2]; SK = argv[3]; ORG = argv[4];
  ONE_CALL = getenv("FLOOR_ONE_CALL") != NULL && strcmp(getenv("FLOOR_ONE_CALL"), "1") == 0;
  int rows = atoi(argv[5]), conc = atoi(argv[6]), first = atoi(argv[7]);
  int socket_loop = argc > 8 && strcmp(argv[8], "socket") == 0;
  long spin_us = argc > 9 ? atol(argv[9]) : 0;
  curl_global_init(CURL_GLOBAL_DEFAULT);
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  get_token();
  CURLM *m = curl_multi_init();
  curl_multi_setopt(m, CURLMOPT_MAXCONNECTS, (long)conc * 2);
  if (socket_loop) {
    EP = epoll_create1(EPOLL_CLOEXEC);
    if (EP < 0) { perror("epoll_create1"); return 1; }
    curl_multi_setopt(m, CURLMOPT_SOCKETFUNCTION, on_socket);
    curl_multi_setopt(m, CURLMOPT_TIMERFUNCTION, on_timer);
  }
  slot *slots = calloc((size_t)conc, sizeof *slots);
  int next = first, last = first + rows, ok = 0, active = 0;
  for (int i = 0; i < conc && next < last; i++) {
    slot *s = &slots[i];
    s->h = curl_easy_init();
    curl_easy_setopt(s->h, CURLOPT_WRITEFUNCTION, on_data);
    curl_easy_setopt(s->h, CURLOPT_WRITEDATA, &s->body);
    curl_easy_setopt(s->h, CURLOPT_PRIVATE, s);
    curl_easy_setopt(s->h, CURLOPT_NOSIGNAL, 1L);
    s->row = next++; s->stage = ONE_CALL ? 1 : 0;
    prepare(s);
    curl_multi_add_handle(m, s->h); active++;
  }
  while (active > 0) {
    int running, nmsg;
    if (socket_loop) {
      socket_turn(m);
    } else {
      curl_multi_perform(m, &running);
      if (running == active) {             /* nothing finished yet: wait for activity */
        curl_multi_poll(m, NULL, 0, 1000, NULL);
        curl_multi_perform(m, &running);
      }
    }
    CURLMsg *msg;
    while ((msg = curl_multi_info_read(m, &nmsg))) {
      if (msg->msg != CURLMSG_DONE) continue;
      slot *s; curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&s);
      curl_multi_remove_handle(m, s->h); active--;
      if (spin_us > 0) {
        struct timespec a, b;
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &a);
        do clock_gettime(CLOCK_THREAD_CPUTIME_ID, &b);
        while ((b.tv_sec - a.tv_sec) * 1000000L + (b.tv_nsec - a.tv_nsec) / 1000 < spin_us);
      }
      int good = msg->data.result == CURLE_OK && s->body.p && strstr(s->body.p, "\"code\":0");
      if (good && s->stage == 0) {
        char *a = strstr(s->body.p, "\"assetId\":\"");
        if (a) { a += 11; char *e = strchr(a, '"'); snprintf(s->asset, sizeof s->asset, "%.*s", (int)(e - a), a); }
      }
      if (good && s->stage < 2 && !ONE_CALL) { s->stage++; }
      else {
        if (good) ok++;
        if (next >= last) continue;
        s->row = next++; s->stage = ONE_CALL ? 1 : 0;
      }
      prepare(s);
      curl_multi_add_handle(m, s->h); active++;
    }
  }
  clock_gettime(CLOCK_MONOTONIC, &t1);
  struct rusage ru; getrusage(RUSAGE_SELF, &ru);
  double cpu = ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
  double el = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
  printf("{\"rows\":%d,\"ok\":%d,\"elapsed_s\":%.3f,\"cpu_s\":%.3f,\"maxrss_kb\":%ld}\n", rows, ok, el, cpu, ru.ru_maxrss);
  for (int i = 0; i < conc; i++) { if (slots[i].h) curl_easy_cleanup(slots[i].h); curl_slist_free_all(slots[i].hdrs); free(slots[i].body.p); }
  free(slots); curl_multi_cleanup(m); curl_global_cleanup();
  return ok == rows ? 0 : 1;
}
