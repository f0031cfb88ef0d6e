/* The plan reader's C helpers on untrusted plan lines: csv_split (a plain line split at every comma; nil when
 * the line holds a quote), json_key_count (strings followed by ':'), and keyset (the duplicate search's
 * fingerprint set). Checks: the cells joined by ',' give the line back; nil exactly when there is a quote; the
 * key count is at most the number of ':'; every cell added to a keyset is then "seen", and adding it again
 * says so; count() never exceeds the distinct cells. */
#include "fuzz_common.h"

static void fz_one(const uint8_t *data, size_t size) {
  lua_State *L = fz_state();
  const char *line = (const char *)data;
  size_t i, colons = 0, cells, joined = 0;
  int quoted = memchr(data, '"', size) != NULL;
  for (i = 0; i < size; i++) if (data[i] == ':') colons++;

  fz_fn(L, "json_key_count");
  lua_pushlstring(L, line, size);
  fz_call(L, 1, 1, "json_key_count");
  FZ_CHECK(lua_isinteger(L, -1), "json_key_count: not an integer");
  FZ_CHECK(lua_tointeger(L, -1) >= 0 && (size_t)lua_tointeger(L, -1) <= colons, "json_key_count: more keys than ':'");
  lua_pop(L, 1);

  fz_fn(L, "csv_split");
  lua_pushlstring(L, line, size);
  fz_call(L, 1, 1, "csv_split");                                   /* 1: cells | nil */
  if (quoted) { FZ_CHECK(lua_isnil(L, -1), "csv_split: a quoted line split in C"); return; }
  FZ_CHECK(lua_istable(L, -1), "csv_split: no table for a plain line");
  cells = (size_t)luaL_len(L, -1);
  for (i = 0; i < size; i++) if (data[i] == ',') joined++;
  FZ_CHECK(cells == joined + 1, "csv_split: not one cell more than commas");

  fz_fn(L, "keyset");
  fz_call(L, 0, 1, "keyset");                                      /* 2: set */
  joined = 0;
  for (i = 1; i <= cells; i++) {
    size_t n;
    const char *cell;
    lua_rawgeti(L, 1, (lua_Integer)i);                             /* 3: cell */
    cell = lua_tolstring(L, -1, &n);
    FZ_CHECK(cell != NULL, "csv_split: a cell that is not a string");
    FZ_CHECK(joined + n <= size && memcmp(line + joined, cell, n) == 0, "csv_split: cells differ from the line");
    joined += n + 1;
    lua_getfield(L, 2, "add");
    lua_pushvalue(L, 2);
    lua_pushvalue(L, 3);
    fz_call(L, 2, 1, "keyset:add");
    lua_pop(L, 1);
    lua_getfield(L, 2, "add");
    lua_pushvalue(L, 2);
    lua_pushvalue(L, 3);
    fz_call(L, 2, 1, "keyset:add again");
    FZ_CHECK(lua_toboolean(L, -1), "keyset: a string added twice not seen");
    lua_pop(L, 1);
    lua_getfield(L, 2, "has");
    lua_pushvalue(L, 2);
    lua_pushvalue(L, 3);
    fz_call(L, 2, 1, "keyset:has");
    FZ_CHECK(lua_toboolean(L, -1), "keyset: an added string not had");
    lua_pop(L, 2);
  }
  FZ_CHECK(joined == size + 1, "csv_split: cells shorter than the line");
  lua_getfield(L, 2, "count");
  lua_pushvalue(L, 2);
  fz_call(L, 1, 1, "keyset:count");
  FZ_CHECK(lua_tointeger(L, -1) >= 1 && (size_t)lua_tointeger(L, -1) <= cells, "keyset: count out of range");
}
