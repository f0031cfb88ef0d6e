#!/usr/bin/env bash
# make bench: enos's batch against the floor (C, libcurl multi + OpenSSL, the same signed calls),
# a curl-per-replace shell loop, the cost of secret decryption, and peak memory by plan size.
# Everything runs against enos-sim on this machine; figures are printed, never asserted.
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${BENCH_ROWS:-3000}          # rows per throughput run
CONC=${BENCH_CONCURRENCY:-64}
MEM_ROWS=${BENCH_MEM_ROWS:-"10000 100000"}
CURL_ROWS=${BENCH_CURL_ROWS:-200}
REPEAT=${BENCH_REPEAT:-7}         # rounds of throughput runs (one of each kind a round); medians are reported
OUT=build/bench
mkdir -p "$OUT"
AK=bench-ak; SK=bench-secret-key; ORG=o15724268424841

cc -O2 -Wall -Wextra -o "$OUT/floor" bench/floor.c -lcurl -lcrypto
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$OUT/app.pem" 2>/dev/null
openssl pkey -in "$OUT/app.pem" -pubout -out "$OUT/app.pub"

sum_mem=0; for m in $MEM_ROWS; do sum_mem=$((sum_mem + m)); done
QPS_SECS=${BENCH_QPS_SECS:-8}     # seconds of work at each --qps cap
ONE_REPEAT=${BENCH_ONE_REPEAT:-3} # rounds of the one-call comparisons (loopback, 20 ms a call)
NEW_ROWS=$((ROWS * 2 + 250 * QPS_SECS + ROWS * 4 * ONE_REPEAT))
TOTAL=$((ROWS * 6 * REPEAT + CURL_ROWS + sum_mem + 110))     # every run replaces its own range
# sim_config PATH N: a simulator config with devices OLD-0000001 … OLD-N (assetIds A…), the bench's app
sim_config() {
lua5.4 - "$1" "$2" "$AK" "$SK" "$OUT/app.pub" <<'LUA'
local path, n, ak, sk, pub = arg[1], tonumber(arg[2]), arg[3], arg[4], arg[5]
local f = assert(io.open(path, "w"))
f:write(('{"apps":[{"access_key":"%s","secret_key":"%s","public_key_file":"%s"}],'):format(ak, sk, pub))
f:write(('"max_devices_per_product":%d,"state_dict_mb":%d,"log_size":100,"devices":['):format(n + 10, math.ceil(n / 300) + 64))
for i = 1, n do
  f:write(i > 1 and "," or "", ('{"productKey":"pk_demo","deviceKey":"OLD-%07d","assetId":"A%07d"}'):format(i, i))
end
f:write("]}")
f:close()
LUA
}
sim_config "$OUT/sim.json" "$TOTAL"

echo "bench: starting enos-sim with $TOTAL devices (2 workers) …"
info=$(bin/enos-sim start --config "$OUT/sim.json" --workers 2 --no-access-log --json)
URL=$(echo "$info" | lua5.4 -e 'print(require("cjson").decode(io.read("a")).url)')
PREFIX=$(echo "$info" | lua5.4 -e 'print(require("cjson").decode(io.read("a")).prefix)')
trap 'bin/enos-sim stop --prefix "$PREFIX" --clean >/dev/null 2>&1 || true' EXIT

field() { lua5.4 -e "local t=require('cjson').decode(io.read('a')) print(t['$1'])"; }
# each run replaces its own range of devices (OLD-n -> NEW-n), so none sees another's changes
next=1
check_all() {
  lua5.4 -e "os.exit(require('cjson').decode(io.read('a')).failed == 0 and 0 or 1)" <<< "$1" ||
    { echo "bench: a run had failed rows: $1" >&2; exit 1; }
}

# Each round runs every kind once, back to back: the machine's speed drifts (a VM), so each kind is compared
# with the floor of its own round, and the medians over the rounds are reported. Runs: $OUT/runs.<kind>.jsonl
echo "bench: throughput at concurrency $CONC, $ROWS rows each, $REPEAT rounds (the C floors: one replaceDevice per device;"
echo "       the Lua floor: get + replaceDevice + get per row, the calls the batch made before its bulk reads)"
for k in floor sfloor luafloor enos jit secret; do : > "$OUT/runs.$k.jsonl"; done
for _ in $(seq "$REPEAT"); do
  r=$(FLOOR_ONE_CALL=1 "$OUT/floor" "$URL" $AK $SK $ORG "$ROWS" "$CONC" "$next"); next=$((next + ROWS))
  lua5.4 -e "assert(require('cjson').decode(io.read('a')).ok == $ROWS, 'floor: rows failed')" <<< "$r"
  echo "$r" >> "$OUT/runs.floor.jsonl"
  r=$(FLOOR_ONE_CALL=1 "$OUT/floor" "$URL" $AK $SK $ORG "$ROWS" "$CONC" "$next" socket); next=$((next + ROWS))
  lua5.4 -e "assert(require('cjson').decode(io.read('a')).ok == $ROWS, 'floor (socket): rows failed')" <<< "$r"
  echo "$r" >> "$OUT/runs.sfloor.jsonl"
  r=$(lua5.4 bench/lua_floor.lua "$URL" $AK $SK $ORG "$ROWS" "$CONC" "$next"); next=$((next + ROWS))
  lua5.4 -e "assert(require('cjson').decode(io.read('a')).ok == $ROWS, 'lua floor: rows failed')" <<< "$r"
  echo "$r" >> "$OUT/runs.luafloor.jsonl"
  r=$(lua5.4 bench/batch_bench.lua "$URL" $AK $SK $ORG "$ROWS" "$CONC" "$next" -); next=$((next + ROWS))
  check_all "$r"; echo "$r" >> "$OUT/runs.enos.jsonl"
  r=$(luajit bench/batch_bench.lua "$URL" $AK $SK $ORG "$ROWS" "$CONC" "$next" -); next=$((next + ROWS))
  check_all "$r"; echo "$r" >> "$OUT/runs.jit.jsonl"
  r=$(lua5.4 bench/batch_bench.lua "$URL" $AK $SK $ORG "$ROWS" "$CONC" "$next" "$OUT/app.pem"); next=$((next + ROWS))
  check_all "$r"; echo "$r" >> "$OUT/runs.secret.jsonl"
done

echo "bench: enos's own CPU per row with the network faked (bench/stub_bench.lua)"
stub54=$(lua5.4 bench/stub_bench.lua "$ROWS" "$CONC" | field us_per_row)
stubjit=$(luajit bench/stub_bench.lua "$ROWS" "$CONC" | field us_per_row)
wf54=$(lua5.4 bench/stub_bench.lua 20000 workflow | field us_per_row)
wfjit=$(luajit bench/stub_bench.lua 20000 workflow | field us_per_row)

echo "bench: curl-per-replace shell loop, $CURL_ROWS replaces"
tok=$(curl -s -X POST "$URL/apim-token-service/v2.0/token/get" -H 'Content-Type: application/json' \
  -d "{\"appKey\":\"$AK\",\"encryption\":\"$(printf '%s%s%s' $AK 1700000000001 $SK | sha256sum | cut -d' ' -f1)\",\"timestamp\":1700000000001}" \
  | lua5.4 -e 'print(require("cjson").decode(io.read("a")).data.accessToken)')
start_loop=$(date +%s.%N)
for i in $(seq "$next" $((next + CURL_ROWS - 1))); do
  old=$(printf 'OLD-%07d' "$i"); new=$(printf 'NEW-%07d' "$i"); ts=$(date +%s%3N)
  body="{\"newDeviceKey\":\"$new\"}"
  sig=$(printf '%s' "${tok}actionreplaceDevicedeviceKey${old}orgId${ORG}productKeypk_demo${body}${ts}${SK}" | sha256sum | cut -d' ' -f1)
  curl -s -o /dev/null -X POST "$URL/connect-service/v2.4/devices?action=replaceDevice&deviceKey=$old&orgId=$ORG&productKey=pk_demo" \
    -H "apim-accesstoken: $tok" -H "apim-timestamp: $ts" -H "apim-signature: $sig" \
    -H 'Content-Type: application/json;charset=UTF-8' -d "$body"
done
end_loop=$(date +%s.%N)
next=$((next + CURL_ROWS))
loop_rate=$(lua5.4 -e "print(string.format('%.1f', $CURL_ROWS / ($end_loop - $start_loop)))")

echo "bench: decryption cost (RSA-2048 + AES), 500 secrets"
decrypt_ms=$(lua5.4 - "$OUT/app.pem" "$OUT/app.pub" <<'LUA'
package.path = "lua/?.lua;lua/?/init.lua;spec/?.lua;" .. package.path
package.cpath = "build/lua5.4/?.so;" .. package.cpath
local H = require "helpers"
local core = require "enos.core"
local key = assert(core.load_private_key(H.readfile(arg[1])))
local sk, ds = H.encrypt_secret(arg[2], "Z5YtZaQpK5IWocakV7zQ")
local t0 = core.monotonic_ms()
for _ = 1, 500 do assert(core.decrypt_secret(key, sk, ds, "pkcs1", "ecb", "raw", "base64")) end
print(string.format("%.3f", (core.monotonic_ms() - t0) / 500))
LUA
)

echo "bench: require time and single-call latency on loopback"
latency=$(lua5.4 - "$URL" $AK $SK $ORG "$next" <<'LUA'
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
package.cpath = "build/lua5.4/?.so;" .. package.cpath
local t0 = os.clock()
local enos = require "enos"
local req_ms = (os.clock() - t0) * 1000
local core = require "enos.core"
local c = assert(enos.client { endpoint = arg[1], access_key = arg[2], secret_key = arg[3], org_id = arg[4] })
local first = tonumber(arg[5])
assert(c:get_device { productKey = "pk_demo", deviceKey = ("OLD-%07d"):format(first) })   -- token and connection
local ms = {}
for i = 0, 99 do
  local s = core.monotonic_ms()
  assert(c:replace_device { productKey = "pk_demo", deviceKey = ("OLD-%07d"):format(first + i),
    newDeviceKey = ("NEW-%07d"):format(first + i) })
  ms[#ms + 1] = core.monotonic_ms() - s
end
table.sort(ms)
print(string.format("%.2f %.2f %.2f", req_ms, ms[50], ms[99]))
LUA
)
next=$((next + 100))
read -r require_ms replace_p50 replace_p99 <<< "$latency"

mem_lines=()
for m in $MEM_ROWS; do
  echo "bench: peak memory, $m-row plan"
  r=$(lua5.4 bench/batch_bench.lua "$URL" $AK $SK $ORG "$m" "$CONC" "$next" "$OUT/app.pem"); next=$((next + m))
  check_all "$r"
  mem_lines+=("$(printf '| peak RSS, %6d-row plan (enos, with secrets) | %6.1f MB | %s rows done at %.0f rows/s |' "$m" \
    "$(echo "$r" | field maxrss_kb | awk '{print $1/1024}')" "$(echo "$r" | field done | cut -d. -f1)" \
    "$(echo "$r" | field rate)")")
done

lua5.4 - "$ROWS" "$OUT" "$loop_rate" "$decrypt_ms" "$CONC" "$stub54" "$stubjit" "$REPEAT" "$wf54" "$wfjit" <<'LUA'
local cjson = require "cjson"
local rows, out, loop, dec, conc = tonumber(arg[1]), arg[2], tonumber(arg[3]), tonumber(arg[4]), arg[5]
local stub54, stubjit, rounds, wf54, wfjit = tonumber(arg[6]), tonumber(arg[7]), arg[8], tonumber(arg[9]), tonumber(arg[10])
local runs = {}
for _, k in ipairs { "floor", "sfloor", "luafloor", "enos", "jit", "secret" } do
  runs[k] = {}
  for l in io.lines(out .. "/runs." .. k .. ".jsonl") do runs[k][#runs[k] + 1] = cjson.decode(l) end
end
local function median(t)
  table.sort(t)
  local n = #t
  return n % 2 == 1 and t[(n + 1) / 2] or (t[n / 2] + t[n / 2 + 1]) / 2
end
-- (an enos run's time is its replace phase: the verification's settle time after the last replace, 2 s, is
-- reported end-to-end in the goals table below)
local function secs(r) return r.replacing_s or r.elapsed_s end
local function rate(k) local t = {} for i, r in ipairs(runs[k]) do t[i] = rows / secs(r) end return median(t) end
local function cpu(k) local t = {} for i, r in ipairs(runs[k]) do t[i] = r.cpu_s * 1000 / rows end return median(t) end
-- each round's run of kind k against that round's floor
local function rate_ratio(k, f)
  local t = {} for i, r in ipairs(runs[k]) do t[i] = runs[f or "floor"][i].elapsed_s / secs(r) end return median(t)
end
local function cpu_ratio(k, f)
  local t = {} for i, r in ipairs(runs[k]) do t[i] = r.cpu_s / runs[f or "floor"][i].cpu_s end return median(t)
end
local function row(name, a, b, note) print(string.format("| %-46s | %9s | %9s | %s |", name, a, b, note or "")) end
print()
print(("enos batch vs the floor, %d rows at concurrency %s, against enos-sim (2 workers) on this machine;"
  .. " medians of %s rounds, ratios against the floor of the same round"):format(rows, conc, rounds))
row("figure", "enos", "floor (C)", "enos / floor")
row(string.rep("-", 46), "---------", "---------", "------------")
row("throughput, Lua 5.4 (rows/s)", ("%.0f"):format(rate "enos"), ("%.0f"):format(rate "floor"),
  ("%.0f%% (goal >= 85%%)"):format(100 * rate_ratio "enos"))
row("client CPU per row, Lua 5.4 (ms)", ("%.3f"):format(cpu "enos"), ("%.3f"):format(cpu "floor"),
  ("%.2fx (goal <= 1.3x)"):format(cpu_ratio "enos"))
row("throughput, LuaJIT (rows/s)", ("%.0f"):format(rate "jit"), ("%.0f"):format(rate "floor"),
  ("%.0f%%"):format(100 * rate_ratio "jit"))
row("client CPU per row, LuaJIT (ms)", ("%.3f"):format(cpu "jit"), ("%.3f"):format(cpu "floor"),
  ("%.2fx"):format(cpu_ratio "jit"))
row("vs the floor on libcurl's socket API (rows/s)", ("%.0f"):format(rate "enos"), ("%.0f"):format(rate "sfloor"),
  ("%.0f%%, CPU %.2fx (LuaJIT %.0f%%, %.2fx): the floor with enos's own event loop"):format(
  100 * rate_ratio("enos", "sfloor"), cpu_ratio("enos", "sfloor"), 100 * rate_ratio("jit", "sfloor"),
  cpu_ratio("jit", "sfloor")))
row("Lua floor: same calls, enos.core only (rows/s)", ("%.0f"):format(rate "luafloor"), ("%.0f"):format(rate "floor"),
  ("%.0f%%, CPU %.2fx (vs the socket floor %.0f%%, %.2fx): no workflow, journal or outputs (bench/lua_floor.lua)")
  :format(100 * rate_ratio "luafloor", cpu_ratio "luafloor", 100 * rate_ratio("luafloor", "sfloor"),
  cpu_ratio("luafloor", "sfloor")))
local er, ec, sr, sc = rate "enos", cpu "enos", rate "secret", cpu "secret"
row("enos's own CPU per row, network faked (ms)", ("%.3f / %.3f"):format(stub54 / 1000, stubjit / 1000), "",
  "Lua 5.4 / LuaJIT: plan, workflow, client, scheduler, journal, outputs")
local budget = 0.3 * cpu "floor" * 1000
row("the workflow alone, zero-cost transport (us/row)", ("%.0f / %.0f"):format(wf54, wfjit), ("%.0f"):format(budget),
  "Lua 5.4 / LuaJIT, vs the 1.3x goal's whole budget above the floor (0.3 x its CPU)")
row("throughput with requireSecret (rows/s)", ("%.0f"):format(sr), "",
  ("decryption %.3f ms/secret, in the worker thread"):format(dec))
row("client CPU per row with requireSecret (ms)", ("%.3f"):format(sc), "",
  ("+%.3f ms/row for the secret (both threads)"):format(sc - ec))
row("curl per replace from a shell loop (rows/s)", ("%.0f"):format(er), ("%.1f"):format(loop),
  ("enos is %.0fx faster"):format(er / loop))
LUA
for l in "${mem_lines[@]}"; do echo "$l"; done
printf '| require "enos" (CPU time, Lua 5.4)             | %6s ms | |\n' "$require_ms"
printf '| one client:replace_device on loopback, p50/p99 | %s / %s ms | (keep-alive, token cached) |\n' \
  "$replace_p50" "$replace_p99"

# Gateway calls per device and the throughput that follows (one replace per device: the goals of the second
# fleet design). The floor here is the C client on libcurl's socket API sending one replaceDevice per device.
# (a simulator of its own, with just the devices these runs replace)
sim_config "$OUT/sim2.json" "$NEW_ROWS"
bin/enos-sim stop --prefix "$PREFIX" --clean >/dev/null 2>&1 || true
info=$(bin/enos-sim start --config "$OUT/sim2.json" --workers 2 --no-access-log --json)
URL=$(echo "$info" | lua5.4 -e 'print(require("cjson").decode(io.read("a")).url)')
PREFIX=$(echo "$info" | lua5.4 -e 'print(require("cjson").decode(io.read("a")).prefix)')
next=1
ADMIN=$(echo "$info" | lua5.4 -e 'print(require("cjson").decode(io.read("a")).admin)')
CA=$(echo "$info" | lua5.4 -e 'print(require("cjson").decode(io.read("a")).ca or "")')
faults() { curl -s ${CA:+--cacert "$CA"} -X "$1" -H 'Content-Type: application/json' ${2:+-d "$2"} "$ADMIN/faults" >/dev/null; }
echo
echo "bench: gateway calls per device, devices/s at --qps caps, and one-call floors (loopback and 20 ms a call)"
calls=()
for rs in 0 1; do
  key=$([ $rs = 1 ] && echo "$OUT/app.pem" || echo -)
  r=$(lua5.4 bench/batch_bench.lua "$URL" $AK $SK $ORG "$ROWS" "$CONC" "$next" "$key"); next=$((next + ROWS))
  check_all "$r"
  calls+=("$(echo "$r" | lua5.4 -e 'local t=require("cjson").decode(io.read("a")) print(string.format("%.3f", t.requests / t.done))')")
done
qline=()
for q in 50 200; do
  n=$((q * QPS_SECS))
  r=$(BENCH_QPS=$q lua5.4 bench/batch_bench.lua "$URL" $AK $SK $ORG "$n" "$CONC" "$next" -); next=$((next + n))
  check_all "$r"
  qline+=("$(echo "$r" | lua5.4 -e 'local t=require("cjson").decode(io.read("a"))
    print(string.format("%.1f %.1f", t.done / t.elapsed_s, t.done / t.replacing_s))')")
done
one_runs() {   # FIRST -> lines "floor_rate floor_cpu enos_rate enos_cpu enos_replacing_rate" per round
  local n=$1      # (run in $(…): the caller advances its own `next` by 2 * ROWS * ONE_REPEAT)
  for _ in $(seq "$ONE_REPEAT"); do
    f=$(FLOOR_ONE_CALL=1 "$OUT/floor" "$URL" $AK $SK $ORG "$ROWS" "$CONC" "$n" socket); n=$((n + ROWS))
    e=$(lua5.4 bench/batch_bench.lua "$URL" $AK $SK $ORG "$ROWS" "$CONC" "$n" -); n=$((n + ROWS))
    check_all "$e"
    lua5.4 - "$f" "$e" <<'LUA'
local cj = require "cjson"
local f, e = cj.decode(arg[1]), cj.decode(arg[2])
assert(f.ok == f.rows, "floor: rows failed")
print(f.rows / f.elapsed_s, f.cpu_s * 1000 / f.rows, e.done / e.elapsed_s, e.cpu_s * 1000 / e.done,
  e.done / e.replacing_s)
LUA
  done
}
loop_one=$(one_runs "$next"); next=$((next + 2 * ROWS * ONE_REPEAT))
faults POST '{"latency_ms":20}'
lat_one=$(one_runs "$next"); next=$((next + 2 * ROWS * ONE_REPEAT))
faults DELETE
lua5.4 - "$ROWS" "$CONC" "$ONE_REPEAT" "${calls[0]}" "${calls[1]}" "${qline[0]}" "${qline[1]}" "$loop_one" "$lat_one" <<'LUA'
local rows, conc, rounds = arg[1], arg[2], arg[3]
local function med(t) table.sort(t) local n = #t return n % 2 == 1 and t[(n + 1) / 2] or (t[n / 2] + t[n / 2 + 1]) / 2 end
local function cols(text)
  local c = { {}, {}, {}, {}, {} }
  for l in text:gmatch("[^\n]+") do local i = 0 for v in l:gmatch("%S+") do i = i + 1 c[i][#c[i] + 1] = tonumber(v) end end
  return c
end
local lo, la = cols(arg[8]), cols(arg[9])
local function ratio(c, a, b) local t = {} for i = 1, #c[a] do t[i] = c[a][i] / c[b][i] end return med(t) end
local q50 = { arg[6]:match("(%S+) (%S+)") }
local q200 = { arg[7]:match("(%S+) (%S+)") }
local function row(a, b, c, d) print(string.format("| %-52s | %-26s | %-12s | %s |", a, b, c, d)) end
print()
print(("The second fleet design's goals: %s rows, concurrency %s, medians of %s rounds where it says so; the end-to-end"
  .. " figures include the verification's settle time (2 s) after the last replace, the 'replacing' ones stop at"
  .. " the last replace"):format(rows, conc, rounds))
row("measure", "enos", "goal", "note")
row(string.rep("-", 52), string.rep("-", 26), "------------", "----")
row("gateway calls per replaced device, requireSecret off", arg[4], "<= 1.05", "was 3.0 (get, replace, get)")
row("gateway calls per replaced device, requireSecret on", arg[5], "<= 1.05", "every request the batch sent, token included")
row("devices/s at --qps 50 (end-to-end / replacing)", q50[1] .. " / " .. q50[2], ">= 45", ("%.2fx / %.2fx the cap"):format(q50[1] / 50, q50[2] / 50))
row("devices/s at --qps 200 (end-to-end / replacing)", q200[1] .. " / " .. q200[2], ">= 180", ("%.2fx / %.2fx the cap"):format(q200[1] / 200, q200[2] / 200))
row("20 ms a call: devices/s vs the one-call floor", ("%.0f vs %.0f"):format(med(la[3]), med(la[1])), ">= 0.85x",
  ("%.2fx end-to-end, %.2fx replacing"):format(ratio(la, 3, 1), ratio(la, 5, 1)))
row("loopback: devices/s vs the one-call floor", ("%.0f vs %.0f"):format(med(lo[3]), med(lo[1])), ">= 0.7x",
  ("%.2fx end-to-end, %.2fx replacing"):format(ratio(lo, 3, 1), ratio(lo, 5, 1)))
row("loopback: client CPU per device vs the floor (ms)", ("%.3f vs %.3f"):format(med(lo[4]), med(lo[2])), "<= 2x",
  ("%.2fx"):format(ratio(lo, 4, 2)))
LUA

# The plan check at fleet scale (issue: --check of 1,000,000 rows, <= 64 MB peak, >= 100,000 rows/s)
CHECK_ROWS=${BENCH_CHECK_ROWS:-1000000}
echo
echo "plan check (batch --check) of $CHECK_ROWS rows, four columns (one carried through); peak RSS of the whole process"
printf '| %-14s | %12s | %10s | %14s | %s |\n' "plan" "rows/s" "peak RSS" "seconds" "goal"
printf '| %-14s | %12s | %10s | %14s | %s |\n' "--------------" "------------" "----------" "--------------" "----"
for lua in lua5.4 luajit; do
  for fmt in csv jsonl; do
    p="$OUT/check-plan.$fmt"
    [ -f "$p" ] && [ "$(wc -l < "$p")" -ge "$CHECK_ROWS" ] || lua5.4 bench/check_bench.lua write "$p" "$CHECK_ROWS" "$fmt"
    read -r n errs secs rate hwm <<< "$($lua bench/check_bench.lua check "$p")"
    [ "$errs" = 0 ] && [ "$n" = "$CHECK_ROWS" ] || { echo "check bench: $n rows, $errs errors"; exit 1; }
    printf '| %-14s | %12s | %7.1f MB | %14s | %s |\n' "$fmt, $lua" "$rate" "$(echo "$hwm" | awk '{print $1/1024}')" \
      "$secs" ">= 100,000 rows/s, <= 64 MB (Lua 5.4 counts)"
  done
done
rm -f "$OUT"/check-plan.*
