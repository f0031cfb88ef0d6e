/* CSV output rows for the batch's credentials and results files.
 *
 * csv_row(rec, columns) -> "cell,cell,…\n", one cell per name in the array `columns`, read
 * from rec: nil is empty, a number or a boolean is written as tostring writes it, anything
 * else is an error. A cell holding , " CR or LF is quoted (quotes doubled). A cell starting
 * with = + @ TAB or CR, or with '-' followed by anything but [A-Za-z0-9_.-], gets a leading '
 * so that a spreadsheet does not evaluate it (spec 15 keeps the rule in Lua as its reference).
 * Rows carry device secrets: the working buffer is cleansed when it grows and when freed. */
#include <stdlib.h>
#include <string.h>
#include "enos.h"

typedef struct {
  char *p;
  size_t len, cap;
} cbuf;

/* Room for `more` bytes (and a spare one). Grows by copying, so no old copy stays uncleansed. */
static int cb_room(cbuf *b, size_t more) {
  size_t need, cap;
  char *np;
  if (more > (size_t)-1 - b->len - 1) return 0;
  need = b->len + more + 1;
  if (need <= b->cap) return 1;
  cap = b->cap ? b->cap : 256;
  while (cap < need) cap = cap > (size_t)-1 / 2 ? need : cap * 2;
  np = malloc(cap);
  if (np == NULL) return 0;
  if (b->p != NULL) {
    memcpy(np, b->p, b->len);
    enos_free_secret(b->p, b->cap);
  }
  b->p = np;
  b->cap = cap;
  return 1;
}

static int word_byte(unsigned char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
         c == '_' || c == '.' || c == '-';
}

static int add_cell(cbuf *b, const char *s, size_t n) {
  size_t i, quotes = 0;
  int quoted = 0, neutral = 0;
  for (i = 0; i < n; i++) {
    char c = s[i];
    if (c == '"') { quotes++; quoted = 1; }
    else if (c == ',' || c == '\r' || c == '\n') quoted = 1;
  }
  if (n > 0) {
    unsigned char c = (unsigned char)s[0];
    if (c == '=' || c == '+' || c == '@' || c == '\t' || c == '\r') neutral = 1;
    else if (c == '-') {
      for (i = 1; i < n && !neutral; i++) neutral = !word_byte((unsigned char)s[i]);
    }
  }
  if (quotes > (size_t)-1 - n - 3 || !cb_room(b, n + quotes + 3)) return 0;
  if (quoted) b->p[b->len++] = '"';
  if (neutral) b->p[b->len++] = '\'';
  if (quotes == 0) {
    if (n > 0) memcpy(b->p + b->len, s, n);
    b->len += n;
  } else {
    for (i = 0; i < n; i++) {
      if (s[i] == '"') b->p[b->len++] = '"';
      b->p[b->len++] = s[i];
    }
  }
  if (quoted) b->p[b->len++] = '"';
  return 1;
}

static int l_csv_row(lua_State *L) {
  cbuf b = {NULL, 0, 0};
  size_t ncol, i;
  luaL_checktype(L, 1, LUA_TTABLE);
  luaL_checktype(L, 2, LUA_TTABLE);
  ncol = (size_t)enos_rawlen(L, 2);
  for (i = 1; i <= ncol; i++) {
    const char *s = "";
    size_t len = 0;
    int t, ok = 1;
    lua_rawgeti(L, 2, (int)i);
    lua_rawget(L, 1);
    t = lua_type(L, -1);
    if (t == LUA_TBOOLEAN) {
      s = lua_toboolean(L, -1) ? "true" : "false";
      len = strlen(s);
    } else if (t == LUA_TSTRING || t == LUA_TNUMBER) {
      s = lua_tolstring(L, -1, &len);
    } else if (t != LUA_TNIL) {
      enos_free_secret(b.p, b.cap);
      return luaL_error(L, "csv_row: column %d holds a %s", (int)i, lua_typename(L, t));
    }
    if (i > 1) {
      ok = cb_room(&b, 1);
      if (ok) b.p[b.len++] = ',';
    }
    ok = ok && add_cell(&b, s, len);
    lua_pop(L, 1);
    if (!ok) {
      enos_free_secret(b.p, b.cap);
      return luaL_error(L, "csv_row: out of memory");
    }
  }
  if (!cb_room(&b, 1)) {
    enos_free_secret(b.p, b.cap);
    return luaL_error(L, "csv_row: out of memory");
  }
  b.p[b.len++] = '\n';
  lua_pushlstring(L, b.p, b.len);
  enos_free_secret(b.p, b.cap);
  return 1;
}

/* csv_split(line) -> {cell, …} for a plan line without quotes (split at every comma, cells as they are),
 * or nil when the line holds a quote (the plan reader's RFC 4180 path takes it then). */
static int l_csv_split(lua_State *L) {
  size_t n, start = 0, i;
  const char *s = luaL_checklstring(L, 1, &n);
  int k = 0;
  if (memchr(s, '"', n) != NULL) { lua_pushnil(L); return 1; }
  lua_createtable(L, 8, 0);
  for (i = 0; i <= n; i++) {
    if (i == n || s[i] == ',') {
      lua_pushlstring(L, s + start, i - start);
      lua_rawseti(L, -2, ++k);
      start = i + 1;
    }
  }
  return 1;
}

/* json_key_count(text) -> how many JSON strings in text are followed (after blanks) by ':', i.e. the keys of
 * every object in it, escapes honoured. The plan reader compares it with the keys lua-cjson decoded: more
 * means a key was repeated (lua-cjson keeps one silently). */
static int l_json_key_count(lua_State *L) {
  size_t n, i = 0, j, keys = 0;
  const char *s = luaL_checklstring(L, 1, &n);
  while (i < n) {
    if (s[i] != '"') { i++; continue; }
    for (j = i + 1; j < n && s[j] != '"'; j++)
      if (s[j] == '\\') j++;
    if (j >= n) break;                                   /* unterminated: cjson has refused it already */
    i = j + 1;
    while (i < n && (s[i] == ' ' || s[i] == '\t' || s[i] == '\r' || s[i] == '\n')) i++;
    if (i < n && s[i] == ':') keys++;
  }
  lua_pushinteger(L, (lua_Integer)keys);
  return 1;
}

static const luaL_Reg csv_funcs[] = {
  {"json_key_count", l_json_key_count},
  {"csv_row", l_csv_row},
  {"csv_split", l_csv_split},
  {NULL, NULL}
};

void enos_open_csv(lua_State *L) {
  luaL_setfuncs(L, csv_funcs, 0);
}
