/* enos.core — shared declarations for the C core. */
#ifndef ENOS_H
#define ENOS_H

#include <stddef.h>
#include "compat.h"

#define ENOS_VERSION "0.1.0"

/* Metatable names (dotted, per docs/design.md). */
#define ENOS_KEY_MT  "enos.key"
#define ENOS_EASY_MT "enos.easy"
#define ENOS_MULTI_MT "enos.multi"

/* util.c */
void enos_cleanse(void *p, size_t n);
void enos_free_secret(void *p, size_t n);
void enos_hex_lower(const unsigned char *in, size_t n, char *out);
int enos_push_errtable(lua_State *L, const char *kind, const char *message);
/* A monotonic clock in ms (durations, deadlines); < 0 if the clock cannot be read. */
double enos_monotonic_ms(void);

/* Module parts: each registers its functions into the table on top of the stack. */
void enos_open_sign(lua_State *L);
void enos_open_secret(lua_State *L);
void enos_open_easy(lua_State *L);
void enos_open_multi(lua_State *L);
void enos_open_file(lua_State *L);
void enos_open_http(lua_State *L);
void enos_open_csv(lua_State *L);
void enos_open_keyset(lua_State *L);
void enos_open_signals(lua_State *L);

#endif
