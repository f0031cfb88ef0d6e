-- A paced /health prober (luasocket, one keep-alive connection): a request every INTERVAL ms for SECONDS,
-- each one timed on its own. Unlike a closed-loop load generator it adds little load, so what it measures
-- is how long the worker makes a cheap request wait. Prints one RESULT line (microseconds).
-- usage: luajit bench/ngx/probe.lua PORT SECONDS INTERVAL_MS TIMEOUT_S
local socket = require "socket"
local port, seconds, interval, timeout = tonumber(arg[1]), tonumber(arg[2] or 2), tonumber(arg[3] or 10),
  tonumber(arg[4] or 10)

local conn
local function connect()
  conn = assert(socket.tcp())
  conn:settimeout(timeout)
  assert(conn:connect("127.0.0.1", port))
end

local function one()
  if not conn then connect() end
  local ok = conn:send("GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
  if not ok then conn:close() conn = nil return false end
  local line = conn:receive("*l")
  if not line then conn:close() conn = nil return false end
  local len = 0
  repeat
    line = conn:receive("*l")
    if not line then conn:close() conn = nil return false end
    local cl = line:lower():match("^content%-length:%s*(%d+)")
    if cl then len = tonumber(cl) end
  until line == ""
  if len > 0 and not conn:receive(len) then conn:close() conn = nil return false end
  return true
end

local times, failures = {}, 0
local t_end = socket.gettime() + seconds
while socket.gettime() < t_end do
  local t0 = socket.gettime()
  if one() then times[#times + 1] = (socket.gettime() - t0) * 1e6 else failures = failures + 1 end
  local left = interval / 1000 - (socket.gettime() - t0)
  if left > 0 then socket.sleep(left) end
end
table.sort(times)
local function pct(p) return times[math.max(1, math.ceil(#times * p / 100))] or 0 end
io.write(string.format("RESULT requests=%d failures=%d p50=%d p90=%d p99=%d max=%d\n", #times, failures,
  pct(50), pct(90), pct(99), times[#times] or 0))
