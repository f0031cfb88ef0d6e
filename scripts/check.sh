#!/usr/bin/env bash
# make check: lint, every spec under Lua 5.4, LuaJIT, 5.3 and 5.1, the C-level specs under valgrind memcheck
# and ASan, the fuzz seeds, and installing (make install/uninstall, the rock). Ends with "N passed, N failed".
set -u
cd "$(dirname "$0")/.."
LOG=build/check
mkdir -p "$LOG"
PASSED=0
FAILED=0
FAILURES=()

note() { printf '\n== %s\n' "$*"; }
count_tap() {   # file label rc
  local p f
  p=$(grep -c '^ok ' "$1" || true)
  f=$(grep -c '^not ok ' "$1" || true)
  if [ "$3" -ne 0 ] && [ "$f" -eq 0 ]; then f=1; fi      # crashed or failed to load
  PASSED=$((PASSED + p)); FAILED=$((FAILED + f))
  [ "$f" -eq 0 ] || FAILURES+=("$2: $f failed (see $1)")
  printf '%s: %d passed, %d failed\n' "$2" "$p" "$f"
}
single() {      # label rc
  if [ "$2" -eq 0 ]; then PASSED=$((PASSED + 1)); echo "$1: ok"
  else FAILED=$((FAILED + 1)); FAILURES+=("$1"); echo "$1: FAILED"; fi
}

SPECS=${SPECS:-spec}

note "luacheck"
luacheck -q lua spec bin sim examples bench scripts > "$LOG/luacheck.log" 2>&1
rc=$?; cat "$LOG/luacheck.log" | tail -n 20; single "luacheck" $rc

busted_flavour() {   # flavour: every spec, TAP into the log
  busted --lua="$1" --cpath="build/$1/?.so" -o TAP $SPECS > "$LOG/busted-$1.tap" 2>&1
  echo $? > "$LOG/busted-$1.rc"
}
report_flavour() {
  grep -A4 '^not ok' "$LOG/busted-$1.tap" | head -n 60
  count_tap "$LOG/busted-$1.tap" "busted $1" "$(cat "$LOG/busted-$1.rc")"
}
for flavour in lua5.4 luajit; do
  note "busted ($flavour)"
  busted_flavour $flavour
  report_flavour $flavour
done
# Lua 5.3 and 5.1 side by side (each waits on the simulator much of the time; CI's time budget is 30 min).
# CHECK_SERIAL=1 runs them one after the other.
note "busted (lua5.3 and lua5.1)"
if [ "${CHECK_SERIAL:-}" = 1 ]; then
  busted_flavour lua5.3; busted_flavour lua5.1
else
  busted_flavour lua5.3 & p53=$!
  busted_flavour lua5.1 & p51=$!
  wait $p53 $p51
fi
report_flavour lua5.3
report_flavour lua5.1

# the transport's portable loop (curl_multi_perform + poll, for systems without epoll), built and run too
note "busted (lua5.4, the portable multi loop: -DENOS_NO_EPOLL)"
mkdir -p build/portable/enos
make -s SO=build/portable/enos/core.so CFLAGS="-O2 -g -DENOS_NO_EPOLL" LUA=lua5.4 build/portable/enos/core.so \
  > "$LOG/portable-build.log" 2>&1 &&
  busted --lua=lua5.4 --cpath="build/portable/?.so" -o TAP spec/13_transport_spec.lua spec/14_multi_spec.lua \
    > "$LOG/busted-portable.tap" 2>&1
rc=$?
grep -A4 '^not ok' "$LOG/busted-portable.tap" 2>/dev/null | head -n 40; tail -n 5 "$LOG/portable-build.log"
count_tap "$LOG/busted-portable.tap" "busted lua5.4 portable loop" $rc

# A checkout that other users cannot enter (/root, mktemp -d, a 0700 home): the nginx servers the specs and
# the simulator start must still load the checkout's modules. Runs the specs that start nginx workers from a
# copy of this checkout (build included) in a private directory.
note "busted (lua5.4) from a private (0700) directory"
priv=$(mktemp -d /tmp/enos-private.XXXXXX)
chmod 700 "$priv"
tar --exclude=./build/check -cf - . | (mkdir "$priv/enos" && cd "$priv/enos" && tar -xf -) &&
  (cd "$priv/enos" && [ "$(stat -c %a "$priv")" = 700 ] &&
   busted --lua=lua5.4 --cpath="build/lua5.4/?.so" -o TAP spec/31_sim_cli_spec.lua spec/32_demo_spec.lua \
     spec/60_ngx_spec.lua) > "$LOG/busted-private.tap" 2>&1
rc=$?
rm -rf "$priv"
grep -A4 '^not ok' "$LOG/busted-private.tap" | head -n 40
count_tap "$LOG/busted-private.tap" "busted lua5.4 from a 0700 directory" $rc

if [ "${SKIP_MEMCHECK:-}" != 1 ]; then
  # quick forms of make valgrind / make asan / make fuzz (the C-level specs; the fuzz seeds replayed)
  note "valgrind memcheck (quick)"
  bash scripts/valgrind.sh --quick > "$LOG/valgrind.log" 2>&1
  rc=$?; tail -n 3 "$LOG/valgrind.log"
  single "valgrind: zero errors, zero definite/indirect leaks" $rc
  note "AddressSanitizer + UBSan (quick)"
  bash scripts/asan.sh --quick > "$LOG/asan.log" 2>&1
  rc=$?; tail -n 3 "$LOG/asan.log"
  single "asan/ubsan: zero reports" $rc
  note "fuzz targets (seed corpus replayed)"
  FUZZ_SECONDS=0 bash scripts/fuzz.sh > "$LOG/fuzz.log" 2>&1
  rc=$?; tail -n 3 "$LOG/fuzz.log"
  single "fuzz seeds: no crash" $rc
fi

note "installing: make install/uninstall, luarocks make, make dist's source rock (--deps-mode none)"
bash scripts/install_check.sh > "$LOG/install.log" 2>&1
rc=$?; cat "$LOG/install.log" | tail -n 12; single "install, uninstall, rock" $rc

if [ ${#FAILURES[@]} -gt 0 ]; then
  note "failures"
  printf '  %s\n' "${FAILURES[@]}"
fi
echo
echo "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
