-- The Lua floor: the floor's calls (get, replaceDevice, get per row, N rows in flight) driven from
-- Lua straight through enos.core (signing, multi), with no workflow, client, journal or outputs.
-- What any Lua design on enos.core pays at least; the gap to enos's batch is enos's own work.
-- usage: lua_floor.lua URL ACCESS_KEY SECRET_KEY ORG ROWS CONCURRENCY FIRST   prints one JSON line
dofile((arg[0]:match("^(.*)/[^/]*$") or ".") .. "/paths.lua")
local enos = require "enos"
local core = require "enos.core"
local cjson = require "cjson"

local url, ak, sk, org = arg[1], arg[2], arg[3], arg[4]
local rows, conc, first = tonumber(arg[5]), tonumber(arg[6]), tonumber(arg[7])
local t0, cpu0 = core.monotonic_ms(), os.clock()
local token = assert(assert(enos.client { endpoint = url, access_key = ak, secret_key = sk, org_id = org })
  :_get_token())
local m = core.multi { max_connections = conc * 2 }
local PATH = url .. "/connect-service/v2.4/devices?"
local CT = "application/json;charset=UTF-8"
local last_ts = 0

local function request(q, body)
  local ts = math.floor(core.now_ms())
  if ts <= last_ts then ts = last_ts + 1 end
  last_ts = ts
  return { method = body and "POST" or "GET", url = PATH .. core.encode_query(q), body = body, timeout = 30,
    once = body and true or nil,
    headers = { ["apim-accesstoken"] = token, ["apim-timestamp"] = string.format("%d", ts),
      ["apim-signature"] = core.signature(token, sk, q, body, ts), ["Content-Type"] = body and CT or nil } }
end

local slot_of, ok, next_row, last = {}, 0, first, first + rows
local function start(s)
  local q
  if s.stage == 0 then
    q = { action = "get", orgId = org, productKey = "pk_demo", deviceKey = ("OLD-%07d"):format(s.row) }
    slot_of[m:add(request(q))] = s
  elseif s.stage == 1 then
    q = { action = "replaceDevice", assetId = s.asset, orgId = org }
    slot_of[m:add(request(q, ('{"newDeviceKey":"NEW-%07d"}'):format(s.row)))] = s
  else
    slot_of[m:add(request { action = "get", assetId = s.asset, orgId = org })] = s
  end
end
for _ = 1, math.min(conc, rows) do
  start { row = next_row, stage = 0 }
  next_row = next_row + 1
end
while m:pending() > 0 do
  for _, done in ipairs(m:wait(1)) do
    local s = slot_of[done.id]
    slot_of[done.id] = nil
    local body = done.res and done.res.body or ""
    local good = body:find('"code":0', 1, true) ~= nil
    if good and s.stage == 0 then s.asset = body:match('"assetId":"([^"]+)"') end
    if good and s.stage < 2 then
      s.stage = s.stage + 1
      start(s)
    else
      if good then ok = ok + 1 end
      if next_row < last then
        s.row, s.stage, next_row = next_row, 0, next_row + 1
        start(s)
      end
    end
  end
end
m:close()
print(cjson.encode { rows = rows, ok = ok, elapsed_s = (core.monotonic_ms() - t0) / 1000, cpu_s = os.clock() - cpu0 })
