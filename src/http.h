/* Pieces shared by the libcurl transports (easy.c, multi.c). */
#ifndef ENOS_HTTP_H
#define ENOS_HTTP_H

#include <curl/curl.h>
#include "enos.h"

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
