/* Small helpers: cleansing secret buffers, hex, structured errors. */
#include <stdlib.h>
#include <time.h>
#include <openssl/crypto.h>
#include "enos.h"

void enos_cleanse(void *p, size_t n) {
  if (p != NULL && n > 0) OPENSSL_cleanse(p, n);
}

void enos_free_secret(void *p, size_t n) {
  if (p == NULL) return;
  enos_cleanse(p, n);
  free(p);
}

void enos_hex_lower(const unsigned char *in, size_t n, char *out) {
  static const char digits[] = "0123456789abcdef";
  size_t i;
  for (i = 0; i < n; i++) {
    out[2 * i] = digits[in[i] >> 4];
    out[2 * i + 1] = digits[in[i] & 0x0f];
  }
  out[2 * n] = '\0';
}

double enos_monotonic_ms(void) {
  struct timespec ts;
  if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0) return -1.0;
  return (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec / 1e6;
}

/* Pushes nil and {kind=, message=}; returns 2 (for `return enos_push_errtable(...)`). */
int enos_push_errtable(lua_State *L, const char *kind, const char *message) {
  lua_pushnil(L);
  lua_createtable(L, 0, 2);
  lua_pushstring(L, kind);
  lua_setfield(L, -2, "kind");
  lua_pushstring(L, message);
  lua_setfield(L, -2, "message");
  return 2;
}
