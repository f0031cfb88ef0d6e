/* Durable files for journals and credentials: created 0600 without a race
 * (O_CREAT|O_EXCL or O_APPEND with an explicit mode), written fully, fsynced,
 * and the directory fsynced after a creation. */
#define _DEFAULT_SOURCE 1      /* flock(2) */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/file.h>
#include <sys/stat.h>
#include "file.h"

#define ENOS_FILE_MT "enos.file"

typedef struct {
  int fd;
} enos_file;

static int push_errno(lua_State *L, const char *what, const char *path) {
  int e = errno;
  lua_pushnil(L);
  lua_pushfstring(L, "%s %s: %s", what, path, strerror(e));
  lua_pushinteger(L, e);
  return 3;
}

static int sync_dir_of(const char *path) {
  char dir[4096];
  const char *slash = strrchr(path, '/');
  int fd, rc;
  size_t n;
  if (slash == NULL) { dir[0] = '.'; dir[1] = '\0'; }
  else {
    n = (size_t)(slash - path);
    if (n == 0) n = 1;                       /* "/file" */
    if (n >= sizeof dir) { errno = ENAMETOOLONG; return -1; }
    memcpy(dir, path, n);
    dir[n] = '\0';
  }
  fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return -1;
  rc = fsync(fd);
  close(fd);
  return rc;
}

/* open_file(path, how) -> file, created | nil, message, errno
 * how: "append" (create if missing, 0600), "excl" (must not exist, 0600). */
static int l_open_file(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  static const char *const hows[] = {"append", "excl", NULL};
  int how = luaL_checkoption(L, 2, "append", hows);
  enos_file *f;
  int flags = O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOFOLLOW, created = 0;
  struct stat st;
  f = lua_newuserdata(L, sizeof *f);
  f->fd = -1;
  luaL_getmetatable(L, ENOS_FILE_MT);
  lua_setmetatable(L, -2);
  if (how == 1) flags |= O_EXCL;
  else if (stat(path, &st) != 0) created = 1;
  f->fd = open(path, flags, 0600);
  if (f->fd < 0) return push_errno(L, "cannot open", path);
  if (how == 1) created = 1;
  if (created && sync_dir_of(path) != 0) return push_errno(L, "cannot sync the directory of", path);
  lua_pushboolean(L, created);
  return 2;
}

static enos_file *check_file(lua_State *L) {
  enos_file *f = luaL_checkudata(L, 1, ENOS_FILE_MT);
  if (f->fd < 0) luaL_argerror(L, 1, "file is closed");
  return f;
}

int enos_file_fd(lua_State *L, int idx) {
  enos_file *f = luaL_checkudata(L, idx, ENOS_FILE_MT);
  if (f->fd < 0) luaL_argerror(L, idx, "file is closed");
  return f->fd;
}

/* f:write(s) -> true | nil, message */
static int file_write(lua_State *L) {
  enos_file *f = check_file(L);
  size_t n, off = 0;
  const char *s = luaL_checklstring(L, 2, &n);
  while (off < n) {
    ssize_t w = write(f->fd, s + off, n - off);
    if (w < 0) {
      if (errno == EINTR) continue;
      lua_pushnil(L);
      lua_pushfstring(L, "write failed: %s", strerror(errno));
      return 2;
    }
    off += (size_t)w;
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* f:sync() -> true | nil, message */
static int file_sync(lua_State *L) {
  enos_file *f = check_file(L);
  if (fsync(f->fd) != 0) {
    lua_pushnil(L);
    lua_pushfstring(L, "fsync failed: %s", strerror(errno));
    return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* f:lock() -> true | false, "busy" | nil, message: an exclusive flock(2) on the open file, without waiting.
 * Held until the file is closed or the process ends (a kill -9 included); closing another descriptor of the
 * same file does not release it (unlike fcntl locks). A journal is locked so that two runs cannot append to it
 * at once. */
static int file_lock(lua_State *L) {
  enos_file *f = check_file(L);
  if (flock(f->fd, LOCK_EX | LOCK_NB) != 0) {
    if (errno == EWOULDBLOCK) {
      lua_pushboolean(L, 0);
      lua_pushliteral(L, "busy");
      return 2;
    }
    lua_pushnil(L);
    lua_pushfstring(L, "flock failed: %s", strerror(errno));
    return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* f:mode() -> permission bits (to warn about a file others can read) */
static int file_mode(lua_State *L) {
  enos_file *f = check_file(L);
  struct stat st;
  if (fstat(f->fd, &st) != 0) return luaL_error(L, "fstat failed: %s", strerror(errno));
  lua_pushinteger(L, (lua_Integer)(st.st_mode & 07777));
  return 1;
}

static int file_close(lua_State *L) {
  enos_file *f = luaL_checkudata(L, 1, ENOS_FILE_MT);
  if (f->fd >= 0) {
    close(f->fd);
    f->fd = -1;
  }
  return 0;
}

/* file_mode(path) -> permission bits | nil, message */
static int l_file_mode(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  struct stat st;
  if (stat(path, &st) != 0) {
    lua_pushnil(L);
    lua_pushfstring(L, "%s: %s", path, strerror(errno));
    return 2;
  }
  lua_pushinteger(L, (lua_Integer)(st.st_mode & 07777));
  return 1;
}

static const char *type_name(mode_t m) {
  if (S_ISREG(m)) return "file";
  if (S_ISDIR(m)) return "directory";
  if (S_ISFIFO(m)) return "fifo";
  if (S_ISCHR(m)) return "char device";
  if (S_ISBLK(m)) return "block device";
  if (S_ISSOCK(m)) return "socket";
  if (S_ISLNK(m)) return "symlink";
  return "other";
}

/* stat(path [, nofollow]) -> {type, size, mode, uid, id} | nil, message, errno (symlinks followed, unless
 * nofollow: then a symlink is "symlink"). `type` is "file",
 * "directory", "fifo", "char device", … (without opening: a FIFO's open would block); `id` is "dev:ino",
 * the same string for two paths that name one file (a hard link, a symlink, another spelling). */
static int l_stat(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  int nofollow = lua_toboolean(L, 2);         /* stat(path, true): the link itself (lstat) */
  struct stat st;
  if ((nofollow ? lstat(path, &st) : stat(path, &st)) != 0) return push_errno(L, "cannot stat", path);
  lua_createtable(L, 0, 5);
  lua_pushstring(L, type_name(st.st_mode));
  lua_setfield(L, -2, "type");
  lua_pushinteger(L, (lua_Integer)st.st_size);
  lua_setfield(L, -2, "size");
  lua_pushinteger(L, (lua_Integer)(st.st_mode & 07777));
  lua_setfield(L, -2, "mode");
  lua_pushinteger(L, (lua_Integer)st.st_uid);
  lua_setfield(L, -2, "uid");
  {
    char id[64];
    snprintf(id, sizeof id, "%llu:%llu", (unsigned long long)st.st_dev, (unsigned long long)st.st_ino);
    lua_pushstring(L, id);
  }
  lua_setfield(L, -2, "id");
  return 1;
}

/* link_durable(from, to) -> true | nil, message, errno: a hard link (fails when `to` exists: the no-clobber
 * publication of a file written under a temporary name), then fsync of the directory */
static int l_link_durable(lua_State *L) {
  const char *from = luaL_checkstring(L, 1), *to = luaL_checkstring(L, 2);
  if (link(from, to) != 0) return push_errno(L, "cannot create", to);
  if (sync_dir_of(to) != 0) return push_errno(L, "cannot sync the directory of", to);
  lua_pushboolean(L, 1);
  return 1;
}

/* access(path, how) -> true | nil, message, errno. how: "r", "w", "x", "rw", ... (for "can I create files
 * in this directory", without creating one) */
static int l_access(lua_State *L) {
  const char *path = luaL_checkstring(L, 1), *how = luaL_optstring(L, 2, "r");
  int mode = 0;
  for (; *how; how++) {
    if (*how == 'r') mode |= R_OK;
    else if (*how == 'w') mode |= W_OK;
    else if (*how == 'x') mode |= X_OK;
    else return luaL_argerror(L, 2, "expected letters among r, w, x");
  }
  if (access(path, mode == 0 ? F_OK : mode) != 0) return push_errno(L, "cannot access", path);
  lua_pushboolean(L, 1);
  return 1;
}

/* isatty(fd) -> boolean: whether descriptor 0, 1 or 2 is a terminal */
static int l_isatty(lua_State *L) {
  lua_Integer fd = luaL_checkinteger(L, 1);
  luaL_argcheck(L, fd >= 0 && fd <= 2, 1, "0, 1 or 2 expected");
  lua_pushboolean(L, isatty((int)fd) == 1);
  return 1;
}

/* rename_durable(from, to) -> true | nil, message: rename (replacing `to`) then fsync the directory */
static int l_rename_durable(lua_State *L) {
  const char *from = luaL_checkstring(L, 1), *to = luaL_checkstring(L, 2);
  if (rename(from, to) != 0) return push_errno(L, "cannot rename to", to);
  if (sync_dir_of(to) != 0) return push_errno(L, "cannot sync the directory of", to);
  lua_pushboolean(L, 1);
  return 1;
}

static const luaL_Reg file_methods[] = {
  {"write", file_write},
  {"sync", file_sync},
  {"mode", file_mode},
  {"lock", file_lock},
  {"close", file_close},
  {NULL, NULL}
};

static const luaL_Reg file_funcs[] = {
  {"open_file", l_open_file},
  {"file_mode", l_file_mode},
  {"rename_durable", l_rename_durable},
  {"link_durable", l_link_durable},
  {"access", l_access},
  {"isatty", l_isatty},
  {"stat", l_stat},
  {NULL, NULL}
};

void enos_open_file(lua_State *L) {
  luaL_newmetatable(L, ENOS_FILE_MT);
  lua_pushcfunction(L, file_close);
  lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, file_close);
  lua_setfield(L, -2, "__close");
  luaL_newlib(L, file_methods);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
  luaL_setfuncs(L, file_funcs, 0);
}
