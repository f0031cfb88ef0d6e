/* keyset(): a set of 64-bit fingerprints of strings, for the plan check's duplicate search over millions of
 * rows. A Lua table of 1,000,000 key strings costs about 120 MB; this costs 8 bytes a slot (at most 16 MB a
 * million keys). A fingerprint match may be a collision, so `add` and `has` answer "maybe seen": the caller
 * confirms the few matches exactly (the plan check re-reads only the keys whose fingerprint matched).
 *
 * The hash is keyed with random bytes per set, so a plan crafted to collide cannot degrade the table into
 * long probe chains (open addressing, linear probing, load at most 0.7). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <openssl/rand.h>
#include "enos.h"

#define ENOS_KEYSET_MT "enos.keyset"

typedef struct {
  uint64_t *slots;       /* 0 = empty */
  size_t cap, count;     /* cap: a power of two */
  uint64_t k0, k1;       /* the hash key */
} enos_keyset;

static const uint64_t M1 = 0x9E3779B97F4A7C15ULL, M2 = 0xC2B2AE3D27D4EB4FULL;

static uint64_t mix(uint64_t x) {           /* a 64-bit finaliser (invertible, full avalanche) */
  x ^= x >> 33;
  x *= 0xFF51AFD7ED558CCDULL;
  x ^= x >> 33;
  x *= 0xC4CEB9FE1A85EC53ULL;
  x ^= x >> 33;
  return x;
}

static uint64_t fingerprint(const enos_keyset *s, const unsigned char *p, size_t n) {
  uint64_t h = s->k0 ^ ((uint64_t)n * M1), w;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    memcpy(&w, p + i, 8);
    w = mix(w ^ s->k1);
    h = (h ^ w) * M2;
    h ^= h >> 29;
  }
  w = 0;
  if (i < n) memcpy(&w, p + i, n - i);
  h = mix((h ^ mix(w ^ s->k1 ^ (uint64_t)(n - i))) * M1);
  return h ? h : 1;
}

static enos_keyset *check_set(lua_State *L) {
  enos_keyset *s = luaL_checkudata(L, 1, ENOS_KEYSET_MT);
  if (s->slots == NULL) luaL_error(L, "keyset: used after it was freed");
  return s;
}

/* the slot holding fp, or the empty slot where it belongs */
static size_t find_slot(const uint64_t *slots, size_t cap, uint64_t fp) {
  size_t i = (size_t)(fp & (cap - 1));
  while (slots[i] != 0 && slots[i] != fp) i = (i + 1) & (cap - 1);
  return i;
}

static int grow(enos_keyset *s) {
  size_t ncap = s->cap * 2, i;
  uint64_t *ns;
  if (ncap < s->cap || ncap > SIZE_MAX / sizeof *ns) return 0;
  ns = calloc(ncap, sizeof *ns);
  if (ns == NULL) return 0;
  for (i = 0; i < s->cap; i++)
    if (s->slots[i] != 0) ns[find_slot(ns, ncap, s->slots[i])] = s->slots[i];
  free(s->slots);
  s->slots = ns;
  s->cap = ncap;
  return 1;
}

/* set:add(s) -> true if a string with this fingerprint was added before (maybe s), else false (now added) */
static int keyset_add(lua_State *L) {
  enos_keyset *s = check_set(L);
  size_t n, i;
  const char *p = luaL_checklstring(L, 2, &n);
  uint64_t fp = fingerprint(s, (const unsigned char *)p, n);
  if ((s->count + 1) * 10 > s->cap * 7 && !grow(s)) return luaL_error(L, "keyset: out of memory");
  i = find_slot(s->slots, s->cap, fp);
  if (s->slots[i] == fp) { lua_pushboolean(L, 1); return 1; }
  s->slots[i] = fp;
  s->count++;
  lua_pushboolean(L, 0);
  return 1;
}

/* set:has(s) -> true if a string with this fingerprint was added (maybe s) */
static int keyset_has(lua_State *L) {
  enos_keyset *s = check_set(L);
  size_t n;
  const char *p = luaL_checklstring(L, 2, &n);
  uint64_t fp = fingerprint(s, (const unsigned char *)p, n);
  lua_pushboolean(L, s->slots[find_slot(s->slots, s->cap, fp)] == fp);
  return 1;
}

/* set:count() -> distinct fingerprints; set:bytes() -> memory held */
static int keyset_count(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)check_set(L)->count);
  return 1;
}

static int keyset_bytes(lua_State *L) {
  enos_keyset *s = check_set(L);
  lua_pushnumber(L, (lua_Number)(s->cap * sizeof *s->slots));
  return 1;
}

/* set:free(): gives the memory back now (also done by the collector) */
static int keyset_free(lua_State *L) {
  enos_keyset *s = luaL_checkudata(L, 1, ENOS_KEYSET_MT);
  free(s->slots);
  s->slots = NULL;
  s->cap = s->count = 0;
  return 0;
}

/* keyset() -> an empty set */
static int l_keyset(lua_State *L) {
  unsigned char key[16];
  enos_keyset *s = lua_newuserdata(L, sizeof *s);
  memset(s, 0, sizeof *s);
  luaL_getmetatable(L, ENOS_KEYSET_MT);
  lua_setmetatable(L, -2);
  if (RAND_bytes(key, (int)sizeof key) != 1) return luaL_error(L, "keyset: no random bytes for the hash key");
  memcpy(&s->k0, key, 8);
  memcpy(&s->k1, key + 8, 8);
  s->cap = 1024;
  s->slots = calloc(s->cap, sizeof *s->slots);
  if (s->slots == NULL) { s->cap = 0; return luaL_error(L, "keyset: out of memory"); }
  return 1;
}

static const luaL_Reg keyset_methods[] = {
  {"add", keyset_add},
  {"has", keyset_has},
  {"count", keyset_count},
  {"bytes", keyset_bytes},
  {"free", keyset_free},
  {NULL, NULL}
};

static const luaL_Reg keyset_funcs[] = {
  {"keyset", l_keyset},
  {NULL, NULL}
};

void enos_open_keyset(lua_State *L) {
  if (luaL_newmetatable(L, ENOS_KEYSET_MT)) {
    lua_newtable(L);
    luaL_setfuncs(L, keyset_methods, 0);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, keyset_free);
    lua_setfield(L, -2, "__gc");
    lua_pushliteral(L, "enos.keyset");
    lua_setfield(L, -2, "__name");
  }
  lua_pop(L, 1);
  luaL_setfuncs(L, keyset_funcs, 0);
}
