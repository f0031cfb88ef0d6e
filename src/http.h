/* Pieces shared by the libcurl transports (easy.c, multi.c). */
#ifndef ENOS_HTTP_H
#define ENOS_HTTP_H

#include <curl/curl.h>
#include "enos.h"

/* A growable buffer with a limit (a reply's body and headers). */
typedef struct enos_buf {
  char *data;
  size_t len, cap, limit;
  int overflow;
} enos_buf;
int enos_buf_append(enos_buf *b, const char *p, size_t n);
void enos_buf_free(enos_buf *b);
/* Pushes a table of the headers in raw (the last block of a reply's header lines), names lowercased. */
int enos_push_headers(lua_State *L, const char *raw, size_t len);

/* Handle-wide options, read once from the Lua options table. */
typedef struct {
  long timeout_ms, connect_timeout_ms;
  size_t max_body;
  int verify;
  char *cafile, *capath, *user_agent;     /* owned copies */
} enos_http_opts;

/* One transfer's state: buffers and the header list, reused across requests. */
typedef struct {
  CURL *curl;
  enos_buf body, hdrs;
  int once, attempts, refused_resend;   /* a `once` request: how often libcurl set out to send it */
  struct curl_slist *slist;
  char errbuf[CURL_ERROR_SIZE];
} enos_xfer;

/* Reads opts from the table at idx (raises on a bad value). Call enos_http_opts_free. */
void enos_http_opts_read(lua_State *L, int idx, enos_http_opts *o);
void enos_http_opts_free(enos_http_opts *o);

/* Creates the easy handle of x with handle-wide options; returns NULL or the rejected option. */
const char *enos_xfer_init(enos_xfer *x, const enos_http_opts *o);
void enos_xfer_free(enos_xfer *x);

/* Sets the request in the table at idx on x (copying the body when copy_body).
 * Raises on misuse before any allocation; returns NULL or an error message. */
const char *enos_xfer_prepare(lua_State *L, int idx, enos_xfer *x, const enos_http_opts *o, int copy_body);

/* Called after the transfer ends: frees per-request state, pushes res or nil, err. */
int enos_xfer_finish(lua_State *L, enos_xfer *x, CURLcode rc);

#endif
