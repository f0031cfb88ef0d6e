# enos — build, test, demo. See README.md.
PREFIX  ?= /usr/local
DESTDIR ?=
LUA     ?= lua5.4
CC      ?= cc

VERSION := $(shell sed -n 's/^#define ENOS_VERSION "\(.*\)"/\1/p' src/enos.h)

# Debian packages the project needs (make deps installs the missing ones).
DEB_PKGS := lua5.4 liblua5.4-dev lua5.3 liblua5.3-dev lua5.1 liblua5.1-0-dev lua-cjson libcurl4-openssl-dev libssl-dev lua-busted lua-check lua-ldoc \
            luarocks luajit2 libluajit2-5.1-dev lua-argparse nginx libnginx-mod-http-lua \
            lua-resty-core lua-luaossl lua-socket pkg-config valgrind openssl curl clang libclang-rt-14-dev wrk

WARN := -Wall -Wextra -Wshadow -Wstrict-prototypes -Wmissing-prototypes -Wpointer-arith \
        -Wcast-qual -Wwrite-strings -Wformat=2 -Wundef -Wconversion -Wno-sign-conversion -Werror
CFLAGS ?= -O2 -g
ALL_CFLAGS = -std=c99 -D_POSIX_C_SOURCE=200809L -fPIC -fvisibility=hidden -pthread $(WARN) $(CFLAGS)
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
SO := build/$(ABI)/enos/core.so

.PHONY: all both abis man dist deps check demo install uninstall clean bench lint asan valgrind fuzz

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
	luacheck -q lua spec bin sim examples bench scripts

# The API reference (LDoc over config.ld) in build/docs. Fails when a public function of the documented modules
# has no doc comment (scripts/doc_check.lua), and when LDoc errs or warns.
.PHONY: docs
docs: deps-ok
	@lua5.4 scripts/doc_check.lua
	@rm -rf build/docs
	@out=$$(ldoc -c config.ld . 2>&1); rc=$$?; \
	warnings=$$(printf '%s\n' "$$out" | grep -v -e '^reading configuration from ' -e '^output written to ' -e '^$$'); \
	if [ $$rc -ne 0 ] || [ -n "$$warnings" ]; then printf '%s\n' "$$out" >&2; echo "enos: ldoc failed or warned" >&2; exit 1; fi
	@echo "enos: API reference in build/docs/index.html"

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

SHARE := $(DESTDIR)$(PREFIX)/share
LIBLUA := $(DESTDIR)$(PREFIX)/lib/lua
BINDIR := $(DESTDIR)$(PREFIX)/bin
MAN1 := $(SHARE)/man/man1
BASH_COMP := $(SHARE)/bash-completion/completions
ZSH_COMP := $(SHARE)/zsh/site-functions
FISH_COMP := $(SHARE)/fish/vendor_completions.d

# Everything install puts down, uninstall takes away (spec: make check installs into a scratch DESTDIR,
# uninstalls, and finds no file left). Lua 5.4 and 5.3 get their own core.so; lib/lua/5.1 gets the LuaJIT
# build, which plain Lua 5.1 loads too (one C API).
install: abis
	for v in 5.4 5.3 5.1; do \
	  install -d $(SHARE)/lua/$$v $(LIBLUA)/$$v/enos && \
	  (cd lua && find enos -name '*.lua' -exec install -D -m 644 {} $(SHARE)/lua/$$v/{} \;) || exit 1; \
	done
	install -m 755 build/lua5.4/enos/core.so $(LIBLUA)/5.4/enos/core.so
	install -m 755 build/lua5.3/enos/core.so $(LIBLUA)/5.3/enos/core.so
	install -m 755 build/luajit/enos/core.so $(LIBLUA)/5.1/enos/core.so
	install -d $(BINDIR) $(MAN1) $(BASH_COMP) $(ZSH_COMP) $(FISH_COMP) $(SHARE)/enos/sim/enos_sim
	install -m 755 bin/enos-replace bin/enos-sim $(BINDIR)/
	install -m 644 man/enos-replace.1 $(MAN1)/enos-replace.1
	install -m 644 completions/enos-replace.bash $(BASH_COMP)/enos-replace
	install -m 644 completions/enos-replace.zsh $(ZSH_COMP)/_enos-replace
	install -m 644 completions/enos-replace.fish $(FISH_COMP)/enos-replace.fish
	install -m 644 sim/README.md $(SHARE)/enos/sim/README.md
	install -m 644 sim/enos_sim/*.lua $(SHARE)/enos/sim/enos_sim/

uninstall:
	for v in 5.4 5.3 5.1; do rm -rf $(SHARE)/lua/$$v/enos $(LIBLUA)/$$v/enos; done
	rm -rf $(SHARE)/enos
	rm -f $(BINDIR)/enos-replace $(BINDIR)/enos-sim $(MAN1)/enos-replace.1 $(BASH_COMP)/enos-replace \
	  $(ZSH_COMP)/_enos-replace $(FISH_COMP)/enos-replace.fish

# The files made from the CLI (kept in the repository: a rock runs no build step of ours).
man: both
	lua5.4 scripts/generate.lua

# The release tarball and the source rock: build/dist/enos-VERSION.tar.gz and enos-VERSION-1.src.rock
# (the checkout's tracked and new files, as they are now).
dist: deps-ok
	rm -rf build/dist && mkdir -p build/dist/enos-$(VERSION)
	git ls-files -co --exclude-standard | grep -v '^build/' | tar -cf - -T - | (cd build/dist/enos-$(VERSION) && tar -xf -)
	cd build/dist && tar -czf enos-$(VERSION).tar.gz enos-$(VERSION) && rm -rf enos-$(VERSION)
	sed 's|url = "enos-$(VERSION).tar.gz"|url = "file://$(CURDIR)/build/dist/enos-$(VERSION).tar.gz"|' \
	  enos-$(VERSION)-1.rockspec > build/dist/enos-$(VERSION)-1.rockspec
	cd build/dist && luarocks --lua-version 5.4 pack enos-$(VERSION)-1.rockspec

clean:
	rm -rf build
