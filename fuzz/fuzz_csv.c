/* csv_row: the batch's output lines (cells come from plans and replies, i.e. from outside).
 * The input is cells separated by 0xFF bytes (a 0xFE byte alone makes that cell nil).
 * Checks: the line ends with one LF; an RFC 4180 reader gets back one cell per column, each
 * the value written, or that value behind a leading ' exactly when the value starts with
 * = + @ TAB CR, or '-' then a byte outside [A-Za-z0-9_.-]. */
#include "fuzz_common.h"

#define MAXCOL 16

static int word_byte(unsigned char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
         c == '_' || c == '.' || c == '-';
}

static int must_neutralise(const uint8_t *v, size_t n) {
  size_t i;
  if (n == 0) return 0;
  if (v[0] == '=' || v[0] == '+' || v[0] == '@' || v[0] == '\t' || v[0] == '\r') return 1;
  if (v[0] != '-') return 0;
  for (i = 1; i < n; i++) if (!word_byte(v[i])) return 1;
  return 0;
}

/* Reads one cell of `line` at *pos into out (unquoted); returns its length. */
static size_t read_cell(const char *line, size_t n, size_t *pos, char *out) {
  size_t i = *pos, k = 0;
  if (i < n && line[i] == '"') {
    i++;
    for (;;) {
      FZ_CHECK(i < n, "unterminated quoted cell");
      if (line[i] == '"') {
        if (i + 1 < n && line[i + 1] == '"') { out[k++] = '"'; i += 2; continue; }
        i++;
        break;
      }
      out[k++] = line[i++];
    }
    FZ_CHECK(i == n || line[i] == ',', "text after a quoted cell");
  } else {
    while (i < n && line[i] != ',') {
      FZ_CHECK(line[i] != '"' && line[i] != '\r' && line[i] != '\n', "special byte in an unquoted cell");
      out[k++] = line[i++];
    }
  }
  *pos = i;
  return k;
}

static void fz_one(const uint8_t *data, size_t size) {
  lua_State *L = fz_state();
  const uint8_t *start[MAXCOL];
  size_t len[MAXCOL], ncol = 0, i = 0, pos = 0, n, c;
  const char *line;
  char *cell;
  while (ncol < MAXCOL) {
    size_t j = i;
    while (j < size && data[j] != 0xFF) j++;
    start[ncol] = data + i;
    len[ncol] = j - i;
    ncol++;
    if (j >= size) break;
    i = j + 1;
  }
  lua_newtable(L);                                   /* 1: rec */
  lua_newtable(L);                                   /* 2: columns */
  for (c = 0; c < ncol; c++) {
    char name[8];
    snprintf(name, sizeof name, "c%zu", c);
    lua_pushstring(L, name);
    lua_rawseti(L, 2, (int)c + 1);
    if (len[c] == 1 && start[c][0] == 0xFE) continue;           /* nil */
    lua_pushstring(L, name);
    lua_pushlstring(L, (const char *)start[c], len[c]);
    lua_rawset(L, 1);
  }
  fz_fn(L, "csv_row");
  lua_pushvalue(L, 1);
  lua_pushvalue(L, 2);
  fz_call(L, 2, 1, "csv_row");
  line = lua_tolstring(L, -1, &n);
  FZ_CHECK(line != NULL && n > 0 && line[n - 1] == '\n', "no final LF");
  n--;
  cell = malloc(n + 1);
  FZ_CHECK(cell != NULL, "malloc");
  for (c = 0; c < ncol; c++) {
    int nil = len[c] == 1 && start[c][0] == 0xFE;
    size_t vn = nil ? 0 : len[c], k;
    const uint8_t *v = start[c];
    if (c > 0) {
      FZ_CHECK(pos < n && line[pos] == ',', "missing separator");
      pos++;
    }
    k = read_cell(line, n, &pos, cell);
    if (!nil && must_neutralise(v, vn)) {
      FZ_CHECK(k == vn + 1 && cell[0] == '\'' && memcmp(cell + 1, v, vn) == 0, "neutralised cell differs");
    } else {
      FZ_CHECK(k == vn && (vn == 0 || memcmp(cell, v, vn) == 0), "cell differs");
    }
  }
  FZ_CHECK(pos == n, "more cells than columns");
  free(cell);
}
