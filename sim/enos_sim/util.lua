-- Small helpers shared by the simulator's handlers (runs inside nginx, LuaJIT).
local cjson = require "cjson.safe"
local digest = require "openssl.digest"
local rand = require "openssl.rand"

local M = {}

cjson.encode_number_precision(14)  -- the maximum; epoch ms (13 digits) survive
M.json = cjson
M.null = cjson.null

-- This cjson has no array_mt: an empty Lua table encodes as {}. Lists use M.list(),
-- which puts a marker into an empty list that M.encode turns into [].
local EMPTY = "\1enos_sim_empty_list\1"
local EMPTY_JSON = '["\\u0001enos_sim_empty_list\\u0001"]'

function M.list(t)
  if t == nil or next(t) == nil then return { EMPTY } end
  return t
end

function M.encode(v)
  local s = cjson.encode(v)
  if s and s:find(EMPTY_JSON, 1, true) then
    s = s:gsub("%[\"\\u0001enos_sim_empty_list\\u0001\"%]", "[]")
  end
  return s
end

local byte, format, concat = string.byte, string.format, table.concat

local HEX = {}
for i = 0, 255 do HEX[i] = format("%02x", i) end

function M.hex(s)
  local out = {}
  for i = 1, #s do out[i] = HEX[byte(s, i)] end
  return concat(out)
end

function M.sha256_hex(s)
  return M.hex(digest.new("sha256"):final(s))
end

function M.now_ms()
  ngx.update_time()
  return math.floor(ngx.now() * 1000 + 0.5)
end

local ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

--- n random characters from [A-Za-z0-9] (crypto RNG; modulo bias is irrelevant here).
function M.random_alnum(n)
  local b = rand.bytes(n)
  local out = {}
  for i = 1, n do
    local k = byte(b, i) % 62 + 1
    out[i] = ALNUM:sub(k, k)
  end
  return concat(out)
end

function M.random_hex(nbytes)
  return M.hex(rand.bytes(nbytes))
end

function M.request_id()
  local h = M.random_hex(16)
  return format("%s-%s-%s-%s-%s", h:sub(1, 8), h:sub(9, 12), h:sub(13, 16), h:sub(17, 20), h:sub(21, 32))
end

--- Send a JSON reply. Faults that mangle a reply (truncate, non-JSON, ambiguous drop) hook in here.
function M.send(status, tbl, headers)
  local ctx = ngx.ctx
  if type(tbl) == "table" and tbl.code ~= nil then ctx.code = tbl.code end
  if type(tbl) == "table" and tbl.code == nil then ctx.code = tbl.status or tbl.stauts end
  local body = M.encode(tbl)
  -- certificate serials as bare JSON numbers, as the platform writes them (they pass 2^53: no double holds them)
  if ctx.raw_serials then body = body:gsub('"certSN":"(%d+)"', '"certSN":%1') end
  local post = ctx.post_fault
  if post == "ambiguous" then
    ctx.fault = "ambiguous"
    return ngx.exit(444)
  end
  ngx.status = status
  if headers then
    for k, v in pairs(headers) do ngx.header[k] = v end
  end
  if post == "nonjson" then
    ctx.fault = "nonjson"
    ngx.header["Content-Type"] = "text/html"
    ngx.print("<html><head><title>502 Bad Gateway</title></head><body>upstream sent an invalid response</body></html>\n")
    return ngx.exit(ngx.OK)
  end
  ngx.header["Content-Type"] = "application/json;charset=UTF-8"
  if post == "truncate" then
    ctx.fault = "truncate"
    ngx.header["Content-Length"] = #body
    ngx.print(body:sub(1, math.floor(#body / 2)))
    ngx.flush(true)
    return ngx.exit(444)
  end
  ngx.header["Content-Length"] = #body
  ngx.print(body)
  return ngx.exit(ngx.OK)
end

--- Business reply: HTTP 200 with {code, msg, requestId, data[, pagination]}.
function M.ok(data, pagination)
  local r = { code = 0, msg = "OK", requestId = M.request_id(), data = data }
  if data == nil then r.data = cjson.null end
  if pagination then r.pagination = pagination end
  return M.send(200, r)
end

function M.fail(code, msg)
  return M.send(200, { code = code, msg = msg, requestId = M.request_id(), data = cjson.null })
end

--- Gateway-level reply (before the service): HTTP status with {status, msg[, reason]}.
function M.gateway(status, msg, reason, headers)
  return M.send(status, { status = status, msg = msg, reason = reason }, headers)
end

--- The raw request body, also when nginx buffered it to a file.
function M.body()
  local ctx = ngx.ctx
  if ctx.body ~= nil then return ctx.body end
  ngx.req.read_body()
  local data = ngx.req.get_body_data()
  if not data then
    local path = ngx.req.get_body_file()
    if path then
      local f = io.open(path, "rb")
      if f then data = f:read("*a"); f:close() end
    end
  end
  ctx.body = data or ""
  return ctx.body
end

--- Decoded JSON body; nil, err when it is not a JSON object. An empty body is {}.
function M.body_json()
  local ctx = ngx.ctx
  if ctx.body_json ~= nil then return ctx.body_json end
  local raw = M.body()
  if raw == "" then ctx.body_json = {}; return ctx.body_json end
  local v = cjson.decode(raw)
  if type(v) ~= "table" then return nil, "request body is not a JSON object" end
  ctx.body_json = v
  return v
end

function M.copy(t)
  if type(t) ~= "table" then return t end
  local r = {}
  for k, v in pairs(t) do r[k] = M.copy(v) end
  return setmetatable(r, getmetatable(t))
end

local SECRET_KEYS = {
  encryption = true, accessToken = true, sign = true, deviceSecret = true, sessionKey = true,
  secret_key = true, appSecret = true, password = true, private_key = true,
}

--- Deep copy with secret-bearing fields replaced, for the request log.
function M.redact(t, depth)
  depth = depth or 0
  if type(t) ~= "table" or depth > 8 then return t end
  local r = {}
  for k, v in pairs(t) do
    if SECRET_KEYS[k] then r[k] = "<redacted>" else r[k] = M.redact(v, depth + 1) end
  end
  return r
end

return M
