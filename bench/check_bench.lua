-- The plan check at fleet scale: `batch --check` of a ROWS-row plan (CSV, or JSONL with FORMAT=jsonl).
-- usage: check_bench.lua write PATH ROWS FORMAT   (writes the plan: four columns, one carried through)
--        check_bench.lua check PATH               (prints rows, errors, seconds, rows/s, peak RSS in kB)
local here = dofile((arg[0]:match("^(.*)/[^/]*$") or ".") .. "/paths.lua")
local _ = here
if arg[1] == "write" then
  local path, rows, format = arg[2], tonumber(arg[3]), arg[4]
  local f = assert(io.open(path, "w"))
  if format == "jsonl" then
    for i = 1, rows do
      f:write(('{"productKey":"pk_demo","deviceKey":"OLD-%07d","newDeviceKey":"NEW-%07d","site":"site-%d"}\n')
        :format(i, i, i % 97))
    end
  else
    f:write("productKey,deviceKey,newDeviceKey,site\n")
    for i = 1, rows do f:write(("pk_demo,OLD-%07d,NEW-%07d,site-%d\n"):format(i, i, i % 97)) end
  end
  assert(f:close())
  return
end
local core = require "enos.core"
local batch = require "enos.batch"
local t0 = core.monotonic_ms()
local res = assert(batch.check(arg[2]))
local secs = (core.monotonic_ms() - t0) / 1000
local hwm = 0
for l in io.lines("/proc/self/status") do
  local v = l:match("^VmHWM:%s*(%d+)")
  if v then hwm = tonumber(v) end
end
print(("%d %d %.2f %.0f %d"):format(res.rows, res.error_count, secs, res.rows / secs, hwm))
