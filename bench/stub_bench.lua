-- The batch's own CPU cost with the network taken out: enos.core.multi is replaced by an
-- in-process fake that answers at once like enos-sim (same reply bodies), so what is left
-- is enos's Lua and C work per row (plan, workflow, client, scheduler, journal, outputs).
-- usage: stub_bench.lua ROWS [CONCURRENCY]   prints one JSON line
-- (NOSYNC=1: fsync made a no-op; NOOUT=1: no credentials file; to see what those cost)
--        stub_bench.lua ROWS workflow   the workflow alone (enos.workflow.replace as the batch runs it,
--        three client calls) on a transport that costs nothing: no scheduler, journal, plan or outputs
local here = dofile((arg[0]:match("^(.*)/[^/]*$") or ".") .. "/paths.lua")
local core = require "enos.core"
local cjson = require "cjson"
local rows, conc = tonumber(arg[1] or 3000), tonumber(arg[2] or 64)

local DEVICE = '{"data":{"modelId":"demo_model","productName":{"defaultValue":"Demo product","i18nValue":{"en_US":"Demo product"}},'
  .. '"productType":"Device","deviceName":{"defaultValue":"%s","i18nValue":{}},"deviceDesc":"","timezone":"+08:00",'
  .. '"deviceAttributes":{},"deviceTags":{},"activeTime":0,"lastOnlineTime":0,"lastOfflineTime":0,"productKey":"pk_demo",'
  .. '"orgId":"o15724268424841","assetId":"%s","deviceKey":"%s","createTime":1795983216422,"status":"%s"},'
  .. '"msg":"OK","requestId":"d128a1ff-46a8-27c0-e356-13c4d9c5ae7e","code":0}'
local REPLACE = '{"data":{"assetId":"%s","deviceKey":"%s","productKey":"pk_demo"},"msg":"OK",'
  .. '"requestId":"5a6628d2-c01b-13f7-774f-24cc9b79770f","code":0}'
local HEADERS = "HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: application/json;charset=UTF-8\r\n"
  .. "Content-Length: 968\r\nConnection: keep-alive\r\nDate: Sun, 29 Nov 2026 20:15:21 GMT\r\n\r\n"

local key_of = {}     -- assetId -> current key
local function answer(req)
  local url = req.url
  if url:find("/token/", 1, true) then
    return '{"status":0,"msg":"SUCCESS","business":"apim-token-service","data":{"accessToken":"tok-1","expire":7200}}'
  end
  local q = core.parse_query(url:match("%?(.*)$"))
  if q.action == "search" then           -- the batch's bulk reads: assetId in (…) or deviceKey in (…)
    local expr = cjson.decode(req.body).expression
    local list = {}
    for v in expr:match("in %((.*)%)"):gmatch("'([^']+)'") do
      local a = expr:find("^assetId") and v or ("A" .. v:match("(%d+)$"))
      local k = key_of[a] or ("OLD-" .. a:sub(2))
      if expr:find("^assetId") or k == v then
        list[#list + 1] = DEVICE:format(k, a, k, key_of[a] and "inactive" or "online"):match('^{"data":(%b{})')
      end
    end
    return ('{"data":[%s],"pagination":{"pageNo":1,"pageSize":%d,"totalSize":%d},"msg":"OK","requestId":"r","code":0}')
      :format(table.concat(list, ","), math.max(#list, 1), #list)
  end
  local asset = q.assetId or ("A" .. q.deviceKey:match("(%d+)$"))
  local key = key_of[asset] or ("OLD-" .. asset:sub(2))
  if q.action == "replaceDevice" then
    key = cjson.decode(req.body).newDeviceKey
    key_of[asset] = key
    return REPLACE:format(asset, key)
  end
  if q.deviceKey and q.deviceKey ~= key then
    return '{"code":99400,"msg":"device does not exist","requestId":"r"}'
  end
  return DEVICE:format(key, asset, key, key_of[asset] and "inactive" or "online")
end

if arg[2] == "workflow" then
  local enos = require "enos"
  local workflow = require "enos.workflow"
  -- replies made once, so the transport costs next to nothing (measured and taken off below)
  local BEFORE = { status = 200, raw_headers = HEADERS, body = DEVICE:format("OLD-1", "A1", "OLD-1", "online") }
  local AFTER = { status = 200, raw_headers = HEADERS, body = DEVICE:format("NEW-1", "A1", "NEW-1", "inactive") }
  local REPLACED = { status = 200, raw_headers = HEADERS, body = REPLACE:format("A1", "NEW-1") }
  local TOKEN = { status = 200, raw_headers = HEADERS, body = answer { url = "/token/" } }
  local replaced, calls = false, 0
  local function send(_, req)
    calls = calls + 1
    local url = req.url
    if url:find("/token/", 1, true) then return TOKEN end
    if url:find("replaceDevice", 1, true) then replaced = true return REPLACED end
    if replaced then replaced = false return AFTER end
    return BEFORE
  end
  local c = assert(enos.client { endpoint = "http://127.0.0.1:9", access_key = "ak", secret_key = "sk",
    org_id = "o15724268424841", transport = { send = send } })
  -- (the options the batch gives the workflow by default: three calls a row)
  local batch = require "enos.batch"
  local o = assert(workflow.options { verify = batch.DEFAULTS.verify, check_free = batch.DEFAULTS.check_free,
    require_secret = false, steps = false })

  local req = { url = "/connect-service/v2.4/devices?action=get" }
  local t0 = os.clock()
  for _ = 1, rows * 3 do send(nil, req) end
  local fake_s = os.clock() - t0
  calls = 0
  t0 = os.clock()
  for _ = 1, rows do
    local t = workflow.checked_target { productKey = "pk_demo", deviceKey = "OLD-1", newDeviceKey = "NEW-1" }
    local r = assert(workflow.replace(c, t, o))
    assert(r.ok and r.outcome == "replaced", "the workflow did not replace and verify")
  end
  local cpu = os.clock() - t0 - fake_s
  assert(calls == 3 * rows + 1, ("%d calls for %d rows: not the batch's three a row"):format(calls, rows))
  print(cjson.encode { rows = rows, cpu_s = cpu, us_per_row = cpu * 1e6 / rows })
  os.exit(0)
end

local fake = {}
fake.__index = fake
function fake:add(req)
  self.n = self.n + 1
  -- (the libcurl transports parse a reply's headers only when asked: raw here too)
  self.q[#self.q + 1] = { id = self.n, res = { status = 200, body = answer(req), raw_headers = HEADERS,
    new_connections = 0, elapsed = 0.0003 } }
  return self.n
end
function fake:fsync(file)          -- done at once, completed by the next wait like the worker's
  self.n = self.n + 1
  self.q[#self.q + 1] = { id = self.n, res = assert(file:sync()) }
  return self.n
end
function fake.wait(self)
  local q = self.q
  self.q = {}
  return q
end
function fake:pending() return #self.q end
function fake.close() end
core.multi = function() return setmetatable({ n = 0, q = {} }, fake) end

if os.getenv("NOSYNC") then
  local open = core.open_file
  core.open_file = function(...)
    local f, e = open(...)
    if not f then return f, e end
    return setmetatable({ sync = function() return true end }, { __index = function(_, k)
      return function(_, ...) return f[k](f, ...) end end }), e
  end
end
local enos = require "enos"
local batch = require "enos.batch"
local dir, plan = dofile(here .. "/bench/plan.lua")(1, rows)
local c = assert(enos.client { endpoint = "http://127.0.0.1:9", access_key = "ak", secret_key = "sk",
  org_id = "o15724268424841" })
local cpu0 = os.clock()
-- (settle_ms 0: the fake platform shows a write at once, and its wait does not block)
local s = assert(batch.run(c, plan, { concurrency = conc, journal = dir .. "/journal", settle_ms = 0,
  out = not os.getenv("NOOUT") and dir .. "/creds.csv" or nil, require_secret = false }))
local cpu = os.clock() - cpu0
os.execute("rm -rf " .. dir)
print(cjson.encode { rows = rows, done = s.done, failed = s.failed, cpu_s = cpu, us_per_row = cpu * 1e6 / rows,
  fsyncs = s.fsyncs, requests = s.requests })
