-- The nginx bench: does enos block an nginx worker, and how many /replace per second does the example
-- endpoint serve? Run from the repo root (bench/ngx/run.sh does): luajit bench/ngx/bench.lua
-- Figures are printed, never asserted. Needs wrk, nginx with the Lua module, the simulator's deps.
--
-- 1. Non-blocking: one nginx worker; wrk keeps 50 /replace in flight against a simulator answering
--    every call in 200 ms (latency fault) while a second wrk measures GET /health on the same worker.
--    Run with the cosocket transport, then with the blocking libcurl transport forced.
-- 2. Throughput: wrk at concurrency 32 on /replace (each request a different device), no fault.
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local N = dofile("spec/60_ngx_helper.lua")
local H = N.H
local sim = dofile("spec/sim_helper.lua")

local function env_num(name, default) return tonumber(os.getenv(name) or "") or default end
-- enough that no throughput run runs out of devices (a replace of a device already replaced is a 4xx,
-- which is fast and would inflate the rate): 8,000 a second for each of the 4 runs, plus the latency runs
local DEVICES = env_num("BENCH_NGX_DEVICES", 200000)
local LATENCY = env_num("BENCH_NGX_LATENCY_MS", 200)
local INFLIGHT = env_num("BENCH_NGX_INFLIGHT", 50)
local CONC = env_num("BENCH_NGX_CONCURRENCY", 32)
local SECONDS = env_num("BENCH_NGX_SECONDS", 5)
local AK, SK = "ngx-bench-ak", "ngx-bench-secret-key"

local function log(...) io.stderr:write(string.format(...), "\n") end

local function parse(out)
  local line = out:match("RESULT ([^\n]*)")
  if not line then error("wrk gave no RESULT line:\n" .. out) end
  local r = {}
  for k, v in line:gmatch("([%w_]+)=(%d+)") do r[k] = tonumber(v) end
  return r
end

local function ms(us) return string.format("%.1f ms", us / 1000) end

-- wrk command line; env: mode, first device, key prefix.
local function wrk_cmd(url, o)
  local threads = o.threads or 1
  local envs = ("BENCH_MODE=%s BENCH_FIRST=%d BENCH_KEY_PREFIX=%s BENCH_THREADS=%d"):format(o.mode, o.first or 1,
    o.key_prefix or "NGX-", threads)
  return ("env %s wrk -t%d -c%d -d%ds --timeout %ds -s bench/ngx/wrk.lua %s"):format(envs, threads, o.conns,
    o.seconds, o.timeout or 10, N.q(url))
end

-- -------------------------------------------------------------- setup

local kp = H.keypair()
local skf = kp.dir .. "/secret_key"
H.writefile(skf, SK .. "\n", "600")
local devices = {}
for i = 1, DEVICES do
  devices[i] = { productKey = "pk_demo", deviceKey = ("OLD-%07d"):format(i), assetId = ("A%07d"):format(i) }
end
log("bench/ngx: starting enos-sim (2 workers, %d devices) …", DEVICES)
local s = sim.start { tls = true, workers = 2, config = {
  apps = { { access_key = AK, secret_key = SK, public_key_file = kp.public_file } },
  devices = devices, max_devices_per_product = DEVICES + 10, state_dict_mb = math.ceil(DEVICES / 600) + 64,
  log_size = 100,
} }

local running = {}
local function start_example(transport, workers, extra)
  -- no newDeviceKey search: the simulator scans every device for it (EnOS indexes it), which would
  -- make the simulator, not enos, the bottleneck
  local env = { ENOS_TRANSPORT = transport, ENOS_TIMEOUT = "20", ENOS_CHECK_FREE = "0" }
  for k, v in pairs(extra or {}) do env[k] = v end
  local e = N.start_example(s, { secret_key_file = skf, private_key_file = kp.private_file, workers = workers,
    worker_connections = 4096, env = env })
  running[e] = true
  return e
end
local function stop(e) e.stop() running[e] = nil end

local next_device = 1
local function take(n)
  local first = next_device
  next_device = next_device + n
  if next_device > DEVICES + 1 then error("bench/ngx: not enough devices; raise BENCH_NGX_DEVICES") end
  return first
end

local function warm(e)
  -- one replace first: the token fetch and first connections are not what we measure
  local first = take(1)
  local st = N.http { method = "POST", url = e.url .. "/replace", timeout = 30,
    body = ('{"assetId":"A%07d","newDeviceKey":"WARM-%07d"}'):format(first, first) }
  if st ~= 200 then error("bench/ngx: warm-up replace failed with HTTP " .. tostring(st)) end
end

-- -------------------------------------------------------------- 1. non-blocking

local function blocking_run(transport)
  local e = start_example(transport, 1)
  warm(e)
  assert(s:admin("POST", "/faults", { latency_ms = LATENCY }) == 200)
  local first = take(INFLIGHT * 12)
  local f1, f2, f3 = os.tmpname(), os.tmpname(), os.tmpname()
  local rep = wrk_cmd(e.url, { mode = "replace", first = first, conns = INFLIGHT, seconds = 6, timeout = 30,
    key_prefix = transport == "ngx" and "NB-" or "BL-" })
  local health = wrk_cmd(e.url .. "/health", { mode = "get", conns = 1, seconds = 2, timeout = 5 })
  -- a paced prober (every 10 ms, 10 s timeout), then wrk's closed loop; both while the replaces are in flight
  local probes = ("luajit bench/ngx/probe.lua %d 2 10 10"):format(e.port)
  os.execute(("%s > %s 2>&1 & sleep 1; %s > %s 2>&1; %s > %s 2>&1; wait"):format(rep, f1, probes, f3, health, f2))
  s:admin("DELETE", "/faults")
  if os.getenv("BENCH_NGX_VERBOSE") then log("%s\n%s", H.readfile(f1), H.readfile(f2)) end
  local r, h = parse(H.readfile(f1)), parse(H.readfile(f2))
  h.probe = parse(H.readfile(f3))
  os.remove(f1) os.remove(f2) os.remove(f3)
  stop(e)
  return r, h
end

log("bench/ngx: /health while %d replaces are in flight (simulator latency %d ms) …", INFLIGHT, LATENCY)
local nb_rep, nb_health = blocking_run("ngx")
local bl_rep, bl_health = blocking_run("curl")

-- -------------------------------------------------------------- 2. throughput

local function throughput(label, transport, workers, extra)
  local e = start_example(transport, workers, extra)
  warm(e)
  local first = take(math.min(8000 * SECONDS, math.floor((DEVICES - next_device) / 3)))
  local out = H.sh(wrk_cmd(e.url, { mode = "replace", first = first, conns = CONC, threads = 2, seconds = SECONDS,
    key_prefix = "TP" .. workers .. label:sub(1, 1) .. "-" }))
  stop(e)
  local r = parse(out)
  r.label, r.transport, r.workers = label, transport, workers
  return r
end

log("bench/ngx: /replace throughput at concurrency %d for %d s …", CONC, SECONDS)
local tp = {
  throughput("full workflow", "ngx", 1),
  throughput("full workflow", "ngx", 2),
  throughput("replace only", "ngx", 1, { ENOS_VERIFY = "0" }),
  throughput("full workflow", "curl", 1),
}

for e in pairs(running) do e.stop() end
s:stop()
os.execute("rm -rf " .. N.q(kp.dir))

-- -------------------------------------------------------------- report

print(("\n## nginx: GET /health on one worker while %d /replace are in flight (simulator answers in %d ms)\n")
  :format(INFLIGHT, LATENCY))
print("| transport | paced probe: answered | p50 | p99 | max | wrk -c1: answered in 2 s | p50 | p99 | max |" ..
  " replaces done in 6 s |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
local rows = { { "cosocket (enos.transport.ngx)", nb_health, nb_rep },
  { "libcurl, blocking (ENOS_TRANSPORT=curl)", bl_health, bl_rep } }
for _, row in ipairs(rows) do
  local h, r = row[2], row[3]
  local p = h.probe
  local function lat(v, n) return n > 0 and ms(v) or "-" end
  print(("| %s | %d of %d | %s | %s | %s | %d | %s | %s | %s | %d |"):format(row[1], p.requests, p.requests + p.failures,
    lat(p.p50, p.requests), lat(p.p99, p.requests), lat(p.max, p.requests), h.requests, lat(h.p50, h.requests),
    lat(h.p99, h.requests), lat(h.max, h.requests), r.requests - r.non2xx))
end
print(("\n## nginx: POST /replace throughput, wrk concurrency %d, %d s, each request a different device (no fault)\n")
  :format(CONC, SECONDS))
print("| workflow | transport | nginx workers | replaces/s (2xx) | EnOS calls per replace | p50 | p99 | non-2xx | errors |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
local bad = 0
for _, r in ipairs(tp) do
  local calls = r.label == "replace only" and 2 or 3
  print(("| %s | %s | %d | %.0f | %d | %s | %s | %d | %d |"):format(r.label, r.transport == "ngx" and "cosocket" or "libcurl",
    r.workers, (r.requests - r.non2xx) / (r.duration_us / 1e6), calls, ms(r.p50), ms(r.p99), r.non2xx,
    r.timeouts + r.connect_errors + r.read_errors))
  bad = bad + r.non2xx + r.timeouts + r.connect_errors + r.read_errors
end
if bad > 0 then
  print("\n**Warning:** some replaces failed in a run without faults (see non-2xx and errors): the rate counts 2xx only.")
end
print(("\n(%d CPUs shared by wrk, the example nginx and a 2-worker simulator; full workflow = preflight get, " ..
  "replace, verify get (the newDeviceKey search is off: the simulator scans for it); replace only = get, replace)"):format(
  tonumber((H.sh("nproc"):gsub("%s", ""))) or 0))
