#!/usr/bin/env bash
# make fuzz: builds the libFuzzer targets fuzz/fuzz_*.c (clang, -fsanitize=fuzzer,
# address,undefined; enos.core's sources compiled in, liblua5.4 linked into the
# fuzz binaries only) and runs each for FUZZ_SECONDS (default 10).
#   scripts/fuzz.sh                  every target
#   scripts/fuzz.sh fuzz_decode ...  some targets
#   FUZZ_SECONDS=300 FUZZ_JOBS=2 scripts/fuzz.sh
#   FUZZ_SECONDS=0 scripts/fuzz.sh   only replay the committed seeds (a regression run)
#   FUZZ_MERGE=1 scripts/fuzz.sh     afterwards, merge new coverage into fuzz/corpus/ (to commit)
# Seeds come from fuzz/corpus/<target>/ (committed); what the fuzzer finds goes to
# build/fuzz/corpus/<target>/ and crash artifacts to build/fuzz/artifacts/.
# Prints total executions per target; exits non-zero on a crash or a build failure.
set -u
cd "$(dirname "$0")/.."

SECS=${FUZZ_SECONDS:-10}
CC=${FUZZ_CC:-clang}
OUT=build/fuzz
mkdir -p "$OUT/obj" "$OUT/artifacts" "$OUT/logs"

if [ $# -gt 0 ]; then targets=("$@")
else targets=(); for f in fuzz/fuzz_*.c; do targets+=("$(basename "$f" .c)"); done; fi

SAN="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
WARN="-Wall -Wextra -Wshadow -Wstrict-prototypes -Wmissing-prototypes -Wpointer-arith -Wcast-qual
      -Wwrite-strings -Wformat=2 -Wundef -Wconversion -Wno-sign-conversion -Werror"
LUA_CFLAGS=$(pkg-config --cflags lua5.4 2>/dev/null || echo -I/usr/include/lua5.4)
LUA_LIBS=$(pkg-config --libs lua5.4 2>/dev/null || echo -llua5.4)
LIBS=$(pkg-config --libs libcurl openssl 2>/dev/null || echo -lcurl -lssl -lcrypto)

# The module's sources, with coverage instrumentation for the fuzzer.
objs=()
for src in src/*.c; do
  o="$OUT/obj/$(basename "$src" .c).o"
  if [ ! -f "$o" ] || [ "$src" -nt "$o" ] || [ -n "$(find src -name '*.h' -newer "$o")" ]; then
    $CC -std=c99 -D_POSIX_C_SOURCE=200809L -pthread $WARN -O1 -g $SAN -fsanitize=fuzzer-no-link $LUA_CFLAGS \
      -c -o "$o" "$src" || { echo "fuzz: build of $src failed"; exit 2; }
  fi
  objs+=("$o")
done

status=0
summary=()
stamp="$OUT/.started"; touch "$stamp"
for t in "${targets[@]}"; do
  [ -f "fuzz/$t.c" ] || { echo "fuzz: no fuzz/$t.c"; exit 2; }
  $CC -std=c99 -D_POSIX_C_SOURCE=200809L -Wall -Wextra -Werror -O1 -g $SAN -fsanitize=fuzzer $LUA_CFLAGS -Ifuzz \
    -o "$OUT/$t" "fuzz/$t.c" "${objs[@]}" $LUA_LIBS $LIBS -lm -pthread || { echo "fuzz: build of $t failed"; exit 2; }
  mkdir -p "$OUT/corpus/$t" "fuzz/corpus/$t"
  log="$OUT/logs/$t.log"
  extra=()
  if [ "$SECS" = 0 ]; then extra+=(-runs=0); else extra+=("-max_total_time=$SECS"); fi
  JOBS=${FUZZ_JOBS:-1}
  [ "$JOBS" -gt 1 ] && extra+=("-jobs=$JOBS" "-workers=$JOBS")
  [ -f "fuzz/$t.dict" ] && extra+=("-dict=fuzz/$t.dict")
  # New inputs go to the first corpus directory only; the committed seeds are read.
  ASAN_OPTIONS="detect_leaks=1:abort_on_error=0" UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
    "$OUT/$t" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
      -artifact_prefix="$OUT/artifacts/$t-" "${extra[@]}" "$OUT/corpus/$t" "fuzz/corpus/$t" > "$log" 2>&1
  rc=$?
  if [ "$JOBS" -gt 1 ]; then cat fuzz-*.log >> "$log" 2>/dev/null; rm -f fuzz-*.log; fi
  execs=$(grep -h 'stat::number_of_executed_units' "$log" | awk '{s += $2} END {print s + 0}')
  crashes=$(find "$OUT/artifacts" -name "$t-*" -newer "$stamp" | wc -l)
  if [ $rc -ne 0 ] || grep -qE '^==[0-9]+==ERROR|runtime error:|enos fuzz:' "$log"; then
    status=1
    echo "== $t: FAILED (rc $rc); see $log"
    grep -E -A25 '^==[0-9]+==ERROR|runtime error:|enos fuzz:' "$log" | head -n 40
    find "$OUT/artifacts" -name "$t-*" -newer "$stamp"
  fi
  line=$(printf '%-14s %10s executions in %ss, corpus %s, artifacts %s' "$t" "$execs" "$SECS" \
         "$(ls "$OUT/corpus/$t" | wc -l)+$(ls "fuzz/corpus/$t" | wc -l)" "$crashes")
  summary+=("$line")
  echo "$line"
  if [ "${FUZZ_MERGE:-}" = 1 ] && [ $rc -eq 0 ]; then
    "$OUT/$t" -merge=1 "fuzz/corpus/$t" "$OUT/corpus/$t" > "$OUT/logs/$t.merge.log" 2>&1 || status=1
  fi
done

echo
printf '%s\n' "${summary[@]}"
[ $status -eq 0 ] && echo "fuzz: ${#targets[@]} targets, no crash" || echo "fuzz: CRASH or build failure (artifacts in $OUT/artifacts/)"
exit $status
