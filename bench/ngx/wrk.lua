-- wrk script for the nginx bench. BENCH_MODE=replace: POST /replace, each request on a device of its own
-- (assetId = BENCH_ASSET_FMT of BENCH_FIRST + n, new key BENCH_KEY_PREFIX .. n); otherwise plain GETs.
-- done() prints one machine-readable RESULT line (latencies in microseconds).
-- luacheck: globals wrk setup init request done tid
local mode = os.getenv("BENCH_MODE") or "get"
local first = tonumber(os.getenv("BENCH_FIRST") or "1")
local fmt = os.getenv("BENCH_ASSET_FMT") or "A%07d"
local key_prefix = os.getenv("BENCH_KEY_PREFIX") or "NGX-"

local threads = {}
function setup(thread)
  thread:set("tid", #threads)
  threads[#threads + 1] = thread
end

local counter, stride
function init()
  counter = 0
  stride = tonumber(os.getenv("BENCH_THREADS") or "1")
end

function request()
  if mode ~= "replace" then return wrk.format("GET") end
  local n = first + (tid or 0) + counter * stride
  counter = counter + 1
  local body = string.format('{"assetId":"%s","newDeviceKey":"%s%07d"}', string.format(fmt, n), key_prefix, n)
  return wrk.format("POST", "/replace", { ["Content-Type"] = "application/json" }, body)
end

function done(summary, latency)
  io.write(string.format("RESULT requests=%d duration_us=%d non2xx=%d timeouts=%d connect_errors=%d read_errors=%d " ..
    "p50=%d p90=%d p99=%d max=%d\n", summary.requests, summary.duration, summary.errors.status, summary.errors.timeout,
    summary.errors.connect, summary.errors.read, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max))
end
