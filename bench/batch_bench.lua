-- One enos batch run for the benchmark; prints a JSON line (elapsed, cpu, rows/s, peak RSS).
-- usage: batch_bench.lua URL AK SK ORG ROWS CONCURRENCY FIRST KEYFILE|- [check-only]
local here = dofile((arg[0]:match("^(.*)/[^/]*$") or ".") .. "/paths.lua")
local enos = require "enos"
local batch = require "enos.batch"
local core = require "enos.core"
local cjson = require "cjson"

local url, ak, sk, org, rows, conc, first, keyfile, mode = arg[1], arg[2], arg[3], arg[4], tonumber(arg[5]),
  tonumber(arg[6]), tonumber(arg[7]), arg[8], arg[9]
local dir, plan = dofile(here .. "/bench/plan.lua")(first, rows)

local function vmhwm()
  for line in io.lines("/proc/self/status") do
    local kb = line:match("^VmHWM:%s+(%d+)")
    if kb then return tonumber(kb) end
  end
end

local c = assert(enos.client { endpoint = url, access_key = ak, secret_key = sk, org_id = org,
  private_key_file = keyfile ~= "-" and keyfile or nil, timeout = 30 })
local t0, cpu0 = core.monotonic_ms(), os.clock()
local s, err
if mode == "check" then
  s, err = batch.check(plan)
  s.done, s.failed = s.rows, s.error_count
else
  s, err = batch.run(c, plan, { concurrency = conc, journal = dir .. "/journal", out = dir .. "/creds.csv",
    require_secret = keyfile ~= "-", qps = tonumber(os.getenv("BENCH_QPS") or ""),
    settle_ms = tonumber(os.getenv("BENCH_SETTLE_MS") or "") })
end
local elapsed = (core.monotonic_ms() - t0) / 1000
local cpu = os.clock() - cpu0
if not s then io.stderr:write(tostring(err), "\n") os.exit(1) end
print(cjson.encode { rows = rows, done = s.done, failed = s.failed, elapsed_s = elapsed, cpu_s = cpu,
  rate = s.done / elapsed, maxrss_kb = vmhwm(), fsyncs = s.fsyncs, requests = s.requests,
  replacing_s = s.replacing, failed_by_kind = s.failed_by_kind })
if s.failed and s.failed > 0 and s.results then      -- (what failed, for the bench's log)
  local f = io.open(s.results)
  if f then f:read("*l") io.stderr:write("first failed row: ", tostring(f:read("*l")), "\n") f:close() end
end
os.execute("rm -rf " .. dir)
