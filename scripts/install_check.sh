#!/usr/bin/env bash
# What make check proves about installing (called by scripts/check.sh; prints "ok: …" per step, exits non-zero
# at the first failure):
#   1. make install DESTDIR=… → the installed enos-replace (Lua 5.4 and 5.1) and enos-sim run from there, the
#      man page and completions are in place; make uninstall → not one file left behind;
#   2. luarocks make --deps-mode none --tree … (what the README says), then the installed module loads from the tree;
#   3. make dist → the source rock installs into a fresh tree with --deps-mode none (Debian's lua-cjson and
#      lua-argparse are the dependencies), and that tree's enos-replace and enos-sim run.
set -eu
cd "$(dirname "$0")/.."
scratch=$(mktemp -d /tmp/enos-install.XXXXXX)
sim_prefix=
cleanup() {
  if [ -n "$sim_prefix" ]; then "${stop_cmd[@]}" stop --clean --prefix "$sim_prefix" >/dev/null 2>&1 || true; fi
  rm -rf "$scratch"
}
trap cleanup EXIT
step() { printf 'ok: %s\n' "$*"; }

# a simulator started with the given enos-sim command answers a signed call of that install's enos-replace
sim_round_trip() {   # enos-sim command… (array in stop_cmd), enos-replace command in replace_cmd
  local info
  info=$("${stop_cmd[@]}" start --json --no-access-log --prefix "$scratch/sim")
  sim_prefix="$scratch/sim"
  echo "$info" | grep -q '"url":"http:' || { echo "enos-sim start printed: $info"; return 1; }
  local env_lines
  env_lines=$("${stop_cmd[@]}" status --prefix "$sim_prefix" >/dev/null && echo "$info")
  # the credentials it printed, in the environment, make a call that the simulator authenticates
  eval "$(echo "$env_lines" | lua5.4 -e '
    local cjson = require "cjson"
    local info = cjson.decode(io.read("a"))
    for k, v in pairs(info.env) do print(("export %s=%q"):format(k, v)) end')"
  "${replace_cmd[@]}" config >/dev/null
  local out rc=0
  out=$("${replace_cmd[@]}" get --asset-id NoSuchAsset 2>&1) || rc=$?
  # exit 4: the platform refused (the asset is not there): signed, authenticated and answered
  [ "$rc" -eq 4 ] || { echo "enos-replace get answered $rc: $out"; return 1; }
  "${stop_cmd[@]}" stop --clean --prefix "$sim_prefix" >/dev/null
  sim_prefix=
  unset ENOS_ENDPOINT ENOS_ACCESS_KEY ENOS_SECRET_KEY ENOS_ORG_ID ENOS_PRIVATE_KEY_FILE ENOS_CA_FILE
}

# ---------------------------------------------------------------- 1. make install / make uninstall
dest="$scratch/dest"
make -s install DESTDIR="$dest" PREFIX=/usr/local >"$scratch/install.log" 2>&1 ||
  { tail -n 20 "$scratch/install.log"; exit 1; }
p="$dest/usr/local"
for f in bin/enos-replace bin/enos-sim share/man/man1/enos-replace.1 share/bash-completion/completions/enos-replace \
         share/zsh/site-functions/_enos-replace share/fish/vendor_completions.d/enos-replace.fish \
         lib/lua/5.4/enos/core.so lib/lua/5.3/enos/core.so lib/lua/5.1/enos/core.so \
         share/lua/5.4/enos/init.lua share/lua/5.1/enos/cli/init.lua share/enos/sim/enos_sim/server.lua; do
  [ -e "$p/$f" ] || { echo "make install did not put down $f"; exit 1; }
done
step "make install put down the modules (5.4, 5.3, 5.1), both commands, the man page and three completions"
for v in 5.4 5.3 5.1; do
  LUA_PATH="$p/share/lua/$v/?.lua;$p/share/lua/$v/?/init.lua;;" LUA_CPATH="$p/lib/lua/$v/?.so;;" \
    "lua$v" "$p/bin/enos-replace" --version >"$scratch/version" 2>&1 ||
    { cat "$scratch/version"; exit 1; }
  grep -q "^Lua: Lua $v" "$scratch/version" || { cat "$scratch/version"; exit 1; }
  grep -q "^libcurl: " "$scratch/version" && grep -q "^OpenSSL: " "$scratch/version" || { cat "$scratch/version"; exit 1; }
done
step "the installed enos-replace --version runs under lua5.4, lua5.3 and lua5.1"
export LUA_PATH="$p/share/lua/5.4/?.lua;$p/share/lua/5.4/?/init.lua;;" LUA_CPATH="$p/lib/lua/5.4/?.so;;"
stop_cmd=(lua5.4 "$p/bin/enos-sim")
replace_cmd=(lua5.4 "$p/bin/enos-replace")
pushd /tmp >/dev/null; sim_round_trip; popd >/dev/null
unset LUA_PATH LUA_CPATH
step "the installed enos-sim starts, the installed enos-replace calls it with the credentials it printed, it stops"
make -s uninstall DESTDIR="$dest" PREFIX=/usr/local >"$scratch/uninstall.log" 2>&1 ||
  { tail -n 20 "$scratch/uninstall.log"; exit 1; }
left=$(find "$dest" \( -type f -o -type l \) | head -n 20)
[ -z "$left" ] || { echo "make uninstall left behind:"; echo "$left"; exit 1; }
step "make uninstall removed every file make install put down"

# ---------------------------------------------------------------- 2. luarocks make --tree
tree="$scratch/tree-make"
luarocks --lua-version 5.4 --tree "$tree" make --deps-mode none enos-*.rockspec >"$scratch/make.log" 2>&1 ||
  { tail -n 20 "$scratch/make.log"; exit 1; }
rm -rf enos     # (luarocks make builds enos/core.so in the checkout)
(cd /tmp && ENOS_TREE="$tree" LUA_PATH="$tree/share/lua/5.4/?.lua;$tree/share/lua/5.4/?/init.lua;;" \
   LUA_CPATH="$tree/lib/lua/5.4/?.so;;" lua5.4 -e '
     local enos = require "enos"
     assert(package.searchpath("enos.core", package.cpath):find(os.getenv("ENOS_TREE"), 1, true), "core.so not from the tree")
     assert(enos.token_encryption("5acb82e7-a11e-4300-9164-c8b20b638e8b", 1572574909697, "my-app-secret")
       == "4a402ff72d4644a3b5cbbb173ccd04a2b6d8be85bf522780b8626ca800e90545")')
step "luarocks make --tree: the installed module loads from the tree and signs"

# ---------------------------------------------------------------- 3. make dist → the source rock
make -s dist >"$scratch/dist.log" 2>&1 || { tail -n 20 "$scratch/dist.log"; exit 1; }
rock=$(ls build/dist/enos-*.src.rock)
tree="$scratch/tree-rock"
luarocks --lua-version 5.4 --tree "$tree" install --deps-mode none "$rock" >"$scratch/rock.log" 2>&1 ||
  { tail -n 20 "$scratch/rock.log"; exit 1; }
step "make dist packed $(basename "$rock"); it installs into a tree with --deps-mode none"
eval "$(luarocks --lua-version 5.4 --tree "$tree" path)"
stop_cmd=("$tree/bin/enos-sim")
replace_cmd=("$tree/bin/enos-replace")
"${replace_cmd[@]}" --version | grep -q "^enos-replace " || exit 1
[ -e "$tree/share/man/man1/enos-replace.1" ] || [ -n "$(find "$tree" -name enos-replace.1 | head -n 1)" ] ||
  { echo "the rock did not install the man page"; exit 1; }
pushd /tmp >/dev/null; sim_round_trip; popd >/dev/null
step "the rock's enos-replace and enos-sim run from the tree (start, a signed call, stop)"
