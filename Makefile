# enos — build, test, demo. See README.md.
PREFIX  ?= /usr/local
DESTDIR ?=
LUA     ?= lua5.4
CC      ?= cc

VERSION := $(shell sed -n 's/^#define ENOS_VERSION "\(.*\)"/\1/p' src/enos.h)

# Debian packages the project needs (make deps installs the missing ones).
DEB_PKGS := lua5.4 liblua5.4-dev lua5.3 liblua5.3-dev lua5.1 liblua5.1-0-dev lua-cjson libcurl4-openssl-dev libssl-dev lua-busted lua-check \
            luarocks luajit2 libluajit2-5.1-dev lua-argparse nginx libnginx-mod-http-lua \
            lua-resty-core lua-luaossl lua-socket pkg-config valgrind openssl curl clang libclang-rt-14-dev wrk

WARN := -Wall -Wextra -Wshadow -Wstrict-prototypes -Wmissing-prototypes -Wpointer-arith \
        -Wcast-qual -Wwrite-strings -Wformat=2 -Wundef -Wconversion -Wno-sign-conversion -Werror
CFLAGS ?= -O2 -g
ALL_CFLAGS = -std=c99 -D_POSIX_C_SOURCE=200809L -fPIC -pthread $(WARN) $(CFLAGS)
LIBS := $(shell pkg-config --libs libcurl openssl 2>/dev/null || echo -lcurl -lssl -lcrypto)

SRCS := $(wildcard src/*.c)
HDRS := $(wildcard src/*.h)

# One build per Lua ABI (a module built for one does not load in another): lua5.4 (first), luajit (OpenResty),
# lua5.3 and lua5.1 (Lua-scriptable gateways).
ifeq ($(LUA),luajit)
  ABI := luajit
  LUA_CFLAGS := $(shell pkg-config --cflags luajit 2>/dev/null || echo -I/usr/include/luajit-2.1)
else
  ABI := $(LUA)
  LUA_CFLAGS := $(shell pkg-config --cflags $(LUA) 2>/dev/null || echo -I/usr/include/$(LUA))
endif
ifeq ($(LUA),lua5.1)
  LUA_CFLAGS += -DENOS_PLAIN_LUA51
endif
SO := build/$(ABI)/enos/core.so

.PHONY: all both abis deps check demo install uninstall clean bench lint asan valgrind fuzz

all: deps-ok $(SO)

both: deps-ok
	$(MAKE) LUA=lua5.4
	$(MAKE) LUA=luajit

# every ABI: what make check tests
abis: both
	$(MAKE) LUA=lua5.3
	$(MAKE) LUA=lua5.1

$(SO): $(SRCS) $(HDRS)
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) $(LUA_CFLAGS) -shared -o $@ $(SRCS) $(LIBS)

# deps-ok: cheap check, runs `make deps` only when something is missing.
.PHONY: deps-ok
deps-ok:
	@missing=$$(for p in $(DEB_PKGS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then echo "enos: missing packages:" $$missing; $(MAKE) deps; fi

deps:
	@missing=$$(for p in $(DEB_PKGS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	else echo "enos: all Debian packages present"; fi

lint: deps-ok
	luacheck -q lua spec bin sim examples bench

check: abis
	bash scripts/check.sh

# Memory safety: the whole spec suite under ASan+UBSan / valgrind memcheck; libFuzzer targets
# (FUZZ_SECONDS per target, default 10). make check runs the quick forms.
asan: both
	bash scripts/asan.sh

valgrind: both
	bash scripts/valgrind.sh

fuzz: deps-ok
	bash scripts/fuzz.sh

demo: both
	$(LUA) examples/demo.lua

bench: both
	bash bench/run.sh
	@if [ "$${BENCH_NGX:-1}" != 0 ]; then bash bench/ngx/run.sh; fi

LUA_LDIR := $(DESTDIR)$(PREFIX)/share/lua/5.4
LUA_CDIR := $(DESTDIR)$(PREFIX)/lib/lua/5.4
JIT_LDIR := $(DESTDIR)$(PREFIX)/share/lua/5.1
JIT_CDIR := $(DESTDIR)$(PREFIX)/lib/lua/5.1

install: both
	install -d $(LUA_LDIR)/enos $(LUA_CDIR)/enos $(JIT_LDIR)/enos $(JIT_CDIR)/enos $(DESTDIR)$(PREFIX)/bin
	cd lua && find enos -name '*.lua' -exec install -D -m 644 {} $(LUA_LDIR)/{} \;
	cd lua && find enos -name '*.lua' -exec install -D -m 644 {} $(JIT_LDIR)/{} \;
	install -m 755 build/lua5.4/enos/core.so $(LUA_CDIR)/enos/core.so
	install -m 755 build/luajit/enos/core.so $(JIT_CDIR)/enos/core.so
	for f in bin/*; do install -m 755 $$f $(DESTDIR)$(PREFIX)/bin/; done
	install -d $(DESTDIR)$(PREFIX)/share/enos/sim
	cp -R sim/. $(DESTDIR)$(PREFIX)/share/enos/sim/

uninstall:
	rm -rf $(LUA_LDIR)/enos $(LUA_CDIR)/enos $(JIT_LDIR)/enos $(JIT_CDIR)/enos $(DESTDIR)$(PREFIX)/share/enos

clean:
	rm -rf build
