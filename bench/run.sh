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
REPEAT=${BENCH_REPEAT:-5}         # throughput runs of each kind, interleaved; the best of each is reported
OUT=build/bench
mkdir -p "$OUT"
AK=bench-ak; SK=bench-secret-key; ORG=o15724268424841

cc -O2 -Wall -Wextra -o "$OUT/floor" bench/floor.c -lcurl -lcrypto
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$OUT/app.pem" 2>/dev/null
openssl pkey -in "$OUT/app.pem" -pubout -out "$OUT/app.pub"

sum_mem=0; for m in $MEM_ROWS; do sum_mem=$((sum_mem + m)); done
TOTAL=$((ROWS * 5 * REPEAT + CURL_ROWS + sum_mem + 110))     # every run replaces its own range
lua5.4 - "$OUT/sim.json" "$TOTAL" "$AK" "$SK" "$OUT/app.pub" <<'LUA'
local path, n, ak, sk, pub = arg[1], tonumber(arg[2]), arg[3], arg[4], arg[5]
local f = assert(io.open(path, "w"))
f:write(('{"apps":[{"access_key":"%s","secret_key":"%s","public_key_file":"%s"}],'):format(ak, sk, pub))
f:write(('"max_devices_per_product":%d,"state_dict_mb":%d,"log_size":100,"devices":['):format(n + 10, math.ceil(n / 600) + 64))
for i = 1, n do
  f:write(i > 1 and "," or "", ('{"productKey":"pk_demo","deviceKey":"OLD-%07d","assetId":"A%07d"}'):format(i, i))
end
f:write("]}")
f:close()
LUA

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

# the run (a JSON line) with the smallest elapsed time among $1 (one per line)
best() {
  lua5.4 -e 'local b, bt for l in io.lines() do local t = require("cjson").decode(l).elapsed_s
    if not bt or t < bt then b, bt = l, t end end print(b)' <<< "$1"
}
echo "bench: throughput at concurrency $CONC, $ROWS rows each (get + replaceDevice + get per row), best of $REPEAT"
floors=""; enoss=""; jits=""; secrets=""; luafloors=""
for _ in $(seq "$REPEAT"); do
  r=$("$OUT/floor" "$URL" $AK $SK $ORG "$ROWS" "$CONC" "$next"); next=$((next + ROWS))
  lua5.4 -e "assert(require('cjson').decode(io.read('a')).ok == $ROWS, 'floor: rows failed')" <<< "$r"
  floors+="$r"$'\n'
  r=$(lua5.4 bench/lua_floor.lua "$URL" $AK $SK $ORG "$ROWS" "$CONC" "$next"); next=$((next + ROWS))
  lua5.4 -e "assert(require('cjson').decode(io.read('a')).ok == $ROWS, 'lua floor: rows failed')" <<< "$r"
  luafloors+="$r"$'\n'
  r=$(lua5.4 bench/batch_bench.lua "$URL" $AK $SK $ORG "$ROWS" "$CONC" "$next" -); next=$((next + ROWS))
  check_all "$r"; enoss+="$r"$'\n'
  r=$(luajit bench/batch_bench.lua "$URL" $AK $SK $ORG "$ROWS" "$CONC" "$next" -); next=$((next + ROWS))
  check_all "$r"; jits+="$r"$'\n'
  r=$(lua5.4 bench/batch_bench.lua "$URL" $AK $SK $ORG "$ROWS" "$CONC" "$next" "$OUT/app.pem"); next=$((next + ROWS))
  check_all "$r"; secrets+="$r"$'\n'
done
floor=$(best "${floors%$'\n'}"); enos=$(best "${enoss%$'\n'}"); enos_jit=$(best "${jits%$'\n'}")
enos_secret=$(best "${secrets%$'\n'}"); luafloor=$(best "${luafloors%$'\n'}")

echo "bench: enos's own CPU per row with the network faked (bench/stub_bench.lua)"
stub54=$(lua5.4 bench/stub_bench.lua "$ROWS" "$CONC" | field us_per_row)
stubjit=$(luajit bench/stub_bench.lua "$ROWS" "$CONC" | field us_per_row)

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

fr=$(echo "$floor" | field elapsed_s); fc=$(echo "$floor" | field cpu_s)
er=$(echo "$enos" | field elapsed_s); ec=$(echo "$enos" | field cpu_s)
sr=$(echo "$enos_secret" | field elapsed_s); sc=$(echo "$enos_secret" | field cpu_s)
jr=$(echo "$enos_jit" | field elapsed_s); jc=$(echo "$enos_jit" | field cpu_s)
lr=$(echo "$luafloor" | field elapsed_s); lc=$(echo "$luafloor" | field cpu_s)
lua5.4 - "$ROWS" "$fr" "$fc" "$er" "$ec" "$sr" "$sc" "$loop_rate" "$decrypt_ms" "$CONC" "$jr" "$jc" "$stub54" \
  "$stubjit" "$lr" "$lc" <<'LUA'
local rows, fr, fc, er, ec, sr, sc, loop, dec, conc = tonumber(arg[1]), tonumber(arg[2]), tonumber(arg[3]),
  tonumber(arg[4]), tonumber(arg[5]), tonumber(arg[6]), tonumber(arg[7]), tonumber(arg[8]), tonumber(arg[9]), arg[10]
local jr, jc, stub54, stubjit = tonumber(arg[11]), tonumber(arg[12]), tonumber(arg[13]), tonumber(arg[14])
local lr, lc = tonumber(arg[15]), tonumber(arg[16])
local function row(name, a, b, note) print(string.format("| %-44s | %9s | %9s | %s |", name, a, b, note or "")) end
print()
print(("enos batch vs the floor, %d rows at concurrency %s, against enos-sim (2 workers) on this machine"):format(rows, conc))
row("figure", "enos", "floor (C)", "enos / floor")
row(string.rep("-", 44), "---------", "---------", "------------")
row("throughput, Lua 5.4 (rows/s)", ("%.0f"):format(rows / er), ("%.0f"):format(rows / fr), ("%.0f%% (goal >= 85%%)"):format(100 * fr / er))
row("client CPU per row, Lua 5.4 (ms)", ("%.3f"):format(ec * 1000 / rows), ("%.3f"):format(fc * 1000 / rows),
  ("%.2fx (goal <= 1.3x)"):format(ec / fc))
row("throughput, LuaJIT (rows/s)", ("%.0f"):format(rows / jr), ("%.0f"):format(rows / fr),
  ("%.0f%%"):format(100 * fr / jr))
row("client CPU per row, LuaJIT (ms)", ("%.3f"):format(jc * 1000 / rows), ("%.3f"):format(fc * 1000 / rows),
  ("%.2fx"):format(jc / fc))
row("Lua floor: same calls, enos.core only (rows/s)", ("%.0f"):format(rows / lr), ("%.0f"):format(rows / fr),
  ("%.0f%%, CPU %.2fx: no workflow, journal or outputs (bench/lua_floor.lua)"):format(100 * fr / lr, lc / fc))
row("enos's own CPU per row, network faked (ms)", ("%.3f / %.3f"):format(stub54 / 1000, stubjit / 1000), "",
  "Lua 5.4 / LuaJIT: plan, workflow, client, scheduler, journal, outputs")
row("throughput with requireSecret (rows/s)", ("%.0f"):format(rows / sr), "",
  ("decryption %.3f ms/secret, in the worker thread"):format(dec))
row("client CPU per row with requireSecret (ms)", ("%.3f"):format(sc * 1000 / rows), "",
  ("+%.3f ms/row for the secret (both threads)"):format((sc - ec) * 1000 / rows))
row("curl per replace from a shell loop (rows/s)", ("%.0f"):format(rows / er), ("%.1f"):format(loop),
  ("enos is %.0fx faster (and does 3 calls a row)"):format((rows / er) / loop))
LUA
for l in "${mem_lines[@]}"; do echo "$l"; done
printf '| require "enos" (CPU time, Lua 5.4)             | %6s ms | |\n' "$require_ms"
printf '| one client:replace_device on loopback, p50/p99 | %s / %s ms | (keep-alive, token cached) |\n' \
  "$replace_p50" "$replace_p99"
