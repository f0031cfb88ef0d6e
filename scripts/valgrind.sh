#!/usr/bin/env bash
# make valgrind: the spec suite in one lua5.4 process under valgrind memcheck,
# with the module as built by `make` (build/lua5.4/enos/core.so). Zero errors and
# zero definite or indirect leaks, or the script exits non-zero. Child processes
# (nginx, curl, a second lua5.4) are not traced.
#   scripts/valgrind.sh            whole suite
#   scripts/valgrind.sh --quick    the C-level specs (spec/1*_spec.lua, spec/20_client_sim_spec.lua)
#   SPECS="spec/11_secret_spec.lua" scripts/valgrind.sh
#   VALGRIND_TRACK_ORIGINS=yes scripts/valgrind.sh   (slower; says where an uninitialised value came from)
set -u
cd "$(dirname "$0")/.."

. scripts/spec-list.sh "$@"

SO=build/lua5.4/enos/core.so
if [ ! -f "$SO" ] || [ -n "$(find src -newer "$SO" -name '*.[ch]')" ]; then
  make --no-print-directory LUA=lua5.4 >/dev/null || { echo "valgrind: build failed"; exit 2; }
fi

OUT=build/valgrind
mkdir -p "$OUT"
LOG=$OUT/memcheck.log
BUSTED=$(command -v busted)
# --errors-for-leak-kinds: a definite or indirect leak is an error (exit 99);
# possible/reachable are not (the interpreter, OpenSSL and libcurl keep globals).
valgrind --quiet --tool=memcheck --error-exitcode=99 --leak-check=full \
  --show-leak-kinds=definite,indirect --errors-for-leak-kinds=definite,indirect \
  --track-origins="${VALGRIND_TRACK_ORIGINS:-no}" --num-callers=30 --log-file="$LOG" \
  lua5.4 "$BUSTED" --cpath="build/lua5.4/?.so" -o TAP "${specs[@]}" > "$OUT/busted.tap" 2>&1
rc=$?

passed=$(grep -c '^ok ' "$OUT/busted.tap" || true)
failed=$(grep -c '^not ok ' "$OUT/busted.tap" || true)
errors=$(sed -n 's/.*ERROR SUMMARY: \([0-9]*\) errors.*/\1/p' "$LOG" | tail -n 1)
# --quiet prints the summary only when there are errors
[ -z "$errors" ] && { [ $rc -eq 99 ] && errors="?" || errors=0; }
grep -A6 '^not ok' "$OUT/busted.tap" | head -n 60
if [ $rc -eq 99 ] || [ "$errors" != 0 ]; then head -n 120 "$LOG"; fi
if [ $rc -ne 0 ] && [ $rc -ne 99 ] && [ "$failed" -eq 0 ]; then
  echo "busted exited $rc with no failed spec; tail of $OUT/busted.tap:"; tail -n 20 "$OUT/busted.tap"
  failed=1
fi
echo "valgrind: $passed specs passed, $failed failed, $errors memcheck errors (incl. definite/indirect leaks) ($([ $QUICK = 1 ] && echo quick || echo full))"
[ $rc -eq 0 ] && [ "$failed" -eq 0 ] && [ "$errors" = 0 ]
