-- Token service (apim-token-service v2.0) and the per-request signature check.
-- lua_shared_dict "enos_tokens":
--   t:<token>     -> "<appKey>|<expiry ms>"  (kept an hour past expiry so "expired" differs from "unknown")
--   a:<appKey>    -> current token of the app (same token returned while valid)
--   e:<encryption> -> 1 (replay detection, 24 h)
local util = require "enos_sim.util"
local conf = require "enos_sim.conf"

local M = {}

local tokens = ngx.shared.enos_tokens
local REPLAY_TTL = 86400

local function token_reply(status, msg, data)
  local r = { msg = msg, business = "apim-token-service", data = data or util.null }
  -- the documented typo, on demand, so clients can be tested against it
  r[conf.cfg.token_status_typo and "stauts" or "status"] = status
  return util.send(200, r)
end

local function parse_token(v)
  if not v then return nil end
  local app, exp = v:match("^(.*)|(%d+)$")
  return app, tonumber(exp)
end

local function issue(app_key, now)
  local ttl = conf.cfg.token_ttl
  local tok = "APP_" .. util.random_hex(20)
  local exp = now + ttl * 1000
  tokens:set("t:" .. tok, app_key .. "|" .. exp, ttl + 3600)
  return tok, exp
end

--- Validate appKey/encryption/timestamp of a token-service body; returns app or sends the error.
local function check_credentials(body)
  local ak, enc, ts = body.appKey, body.encryption, body.timestamp
  if ak == nil or ak == "" or enc == nil or enc == "" or ts == nil or ts == "" then
    return nil, token_reply(1202, "parameter empty: appKey, encryption and timestamp are required")
  end
  if type(ak) ~= "string" or type(enc) ~= "string" then
    return nil, token_reply(1004, "invalid parameter")
  end
  local ts_text
  if type(ts) == "number" then
    if ts ~= math.floor(ts) or ts < 0 then return nil, token_reply(1004, "invalid parameter: timestamp") end
    ts_text = string.format("%.0f", ts)
  elseif type(ts) == "string" and ts:match("^%d+$") then
    ts_text = ts
  else
    return nil, token_reply(1004, "invalid parameter: timestamp")
  end
  local app = conf.apps[ak]
  if not app then return nil, token_reply(1002, "appKey does not exist") end
  if util.sha256_hex(ak .. ts_text .. app.secret_key) ~= enc then
    return nil, token_reply(1003, "encryption invalid")
  end
  if not tokens:add("e:" .. enc, 1, REPLAY_TTL) then
    return nil, token_reply(1001, "repeated request: this encryption was already used")
  end
  return app
end

function M.token_get()
  if ngx.req.get_method() ~= "POST" then return util.gateway(405, "method not allowed") end
  local body = util.body_json()
  if not body then return token_reply(1004, "invalid parameter: body is not JSON") end
  local app, sent = check_credentials(body)
  if not app then return sent end
  local now = util.now_ms()
  local cur = tokens:get("a:" .. app.access_key)
  if cur then
    local owner, exp = parse_token(tokens:get("t:" .. cur))
    if owner == app.access_key and exp and exp - now > 1000 then
      return token_reply(0, "SUCCESS", { accessToken = cur, expire = math.floor((exp - now) / 1000) })
    end
  end
  local tok, exp = issue(app.access_key, now)
  tokens:set("a:" .. app.access_key, tok, conf.cfg.token_ttl)
  return token_reply(0, "SUCCESS", { accessToken = tok, expire = math.floor((exp - now) / 1000) })
end

function M.token_refresh()
  if ngx.req.get_method() ~= "POST" then return util.gateway(405, "method not allowed") end
  local body = util.body_json()
  if not body then return token_reply(1004, "invalid parameter: body is not JSON") end
  if body.accessToken == nil or body.accessToken == "" then
    return token_reply(1202, "parameter empty: accessToken is required")
  end
  local app, sent = check_credentials(body)
  if not app then return sent end
  local owner, exp = parse_token(tokens:get("t:" .. tostring(body.accessToken)))
  if owner ~= app.access_key then return token_reply(1204, "refresh failed: unknown access token") end
  local now = util.now_ms()
  if exp <= now then return token_reply(1203, "access token expired") end
  -- Inference: the old token stays valid until its own expiry; the new one becomes the app's current token.
  local tok, nexp = issue(app.access_key, now)
  tokens:set("a:" .. app.access_key, tok, conf.cfg.token_ttl)
  return token_reply(0, "SUCCESS", { accessToken = tok, expire = math.floor((nexp - now) / 1000) })
end

--- Mark every token expired now (fault "expire_token_now" / admin).
function M.expire_all()
  local now = util.now_ms()
  local n = 0
  for _, k in ipairs(tokens:get_keys(0)) do
    if k:sub(1, 2) == "t:" then
      local app = parse_token(tokens:get(k))
      if app then tokens:set(k, app .. "|" .. (now - 1), 3600); n = n + 1 end
    elseif k:sub(1, 2) == "a:" then
      tokens:delete(k)
    end
  end
  return n
end

function M.clear()
  tokens:flush_all()
end

local function add_param(parts, name, v)
  if v == true then v = "" end
  parts[#parts + 1] = name .. v
end

--- P of the signature: query params sorted by name, name..decodedValue, no separators.
function M.param_string(args)
  local names = {}
  for k in pairs(args) do names[#names + 1] = k end
  table.sort(names)
  local parts = {}
  for _, k in ipairs(names) do
    local v = args[k]
    if type(v) == "table" then
      for _, x in ipairs(v) do add_param(parts, k, x) end
    else
      add_param(parts, k, v)
    end
  end
  return table.concat(parts)
end

--- Check apim-accesstoken / apim-timestamp / apim-signature. Returns the app, or nil after sending 401.
function M.verify(args)
  local var = ngx.var
  local tok, ts, sig = var.http_apim_accesstoken, var.http_apim_timestamp, var.http_apim_signature
  if not tok or tok == "" then
    return nil, util.gateway(401, "missing apim-accesstoken header", "token_missing")
  end
  local owner, exp = parse_token(tokens:get("t:" .. tok))
  local app = owner and conf.apps[owner]
  if not app then
    return nil, util.gateway(401, "access token invalid or expired", "token_invalid")
  end
  local now = util.now_ms()
  if exp <= now then
    return nil, util.gateway(401, "access token invalid or expired", "token_expired")
  end
  if not ts or not ts:match("^%d+$") then
    return nil, util.gateway(401, "missing or malformed apim-timestamp header", "timestamp_invalid")
  end
  if math.abs(now - tonumber(ts)) > conf.cfg.clock_skew_ms then
    return nil, util.gateway(401, "apim-timestamp out of the accepted clock skew", "timestamp_skew")
  end
  if not sig or sig == "" then
    return nil, util.gateway(401, "missing apim-signature header", "signature_missing")
  end
  local expect = util.sha256_hex(tok .. M.param_string(args) .. util.body() .. ts .. app.secret_key)
  if sig ~= expect then
    return nil, util.gateway(401, "signature mismatch", "signature_mismatch")
  end
  ngx.ctx.app = app.access_key
  return app
end

return M
