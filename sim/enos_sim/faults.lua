-- Fault injection and the request log, both in shared dicts so every worker sees them.
--
-- faults (enos_misc "faults", JSON; "faults_ver" bumps on change so workers re-decode only then):
--   latency_ms, rate_limit = {status=429, retry_after=s, every=n | share=0..1},
--   error_share + error_status (500|503), drop_share, truncate_share, nonjson_share, ambiguous_share,
--   match = "replaceDevice" | {"get","search"} | "token.get" | "login" …, count = n (only the next n matching requests)
--   search_max_expression = n (Search Device refuses a longer expression with 99400),
--   search_lag_ms = n (Search Device omits devices replaced in the last n ms: an index that lags writes)
--   replace_detaches_subdevice = true (a replace drops a sub-device's gateway link: the platform's behaviour is undocumented)
local util = require "enos_sim.util"
local conf = require "enos_sim.conf"

local M = {}

local misc = ngx.shared.enos_misc
local logd = ngx.shared.enos_log
local cjson = util.json

local cached_ver, cached

local function current()
  local ver = misc:get("faults_ver") or 0
  if ver ~= cached_ver then
    local s = misc:get("faults")
    cached = s and cjson.decode(s) or nil
    cached_ver = ver
  end
  return cached
end

M.current = current

local NUMERIC = { latency_ms = true, error_share = true, drop_share = true, truncate_share = true,
  nonjson_share = true, ambiguous_share = true, count = true, error_status = true,
  search_max_expression = true, search_lag_ms = true }

--- Validate and store a fault set; returns the stored table or nil, err.
function M.set(f)
  if type(f) ~= "table" then return nil, "faults must be a JSON object" end
  local stored = {}
  for k, v in pairs(f) do
    if NUMERIC[k] then
      if type(v) ~= "number" then return nil, k .. " must be a number" end
      stored[k] = v
    elseif k == "rate_limit" then
      if type(v) ~= "table" then return nil, "rate_limit must be an object" end
      stored.rate_limit = {
        status = tonumber(v.status) or 429,
        retry_after = tonumber(v.retry_after) or 1,
        every = tonumber(v.every),
        share = tonumber(v.share),
      }
      if not stored.rate_limit.every and not stored.rate_limit.share then stored.rate_limit.share = 1 end
    elseif k == "match" then
      if type(v) == "string" then stored.match = { v }
      elseif type(v) == "table" then stored.match = v
      else return nil, "match must be a string or a list" end
    elseif k == "replace_detaches_subdevice" then
      if type(v) ~= "boolean" then return nil, k .. " must be a boolean" end
      stored[k] = v or nil
    elseif k == "expire_token_now" then
      stored[k] = nil  -- a one-shot action, done by the admin handler
    else
      return nil, "unknown fault option " .. tostring(k)
    end
  end
  if stored.error_status and stored.error_status ~= 500 and stored.error_status ~= 503 then
    return nil, "error_status must be 500 or 503"
  end
  misc:set("fault_used", 0)
  misc:set("fault_seq", 0)
  if next(stored) == nil then
    misc:delete("faults")
  else
    misc:set("faults", cjson.encode(stored))
  end
  misc:incr("faults_ver", 1, 0)
  return stored
end

function M.clear()
  misc:delete("faults")
  misc:incr("faults_ver", 1, 0)
end

local function matches(f, op)
  if not f.match then return true end
  for _, m in ipairs(f.match) do if m == op then return true end end
  return false
end

local function roll(share)
  return share and share > 0 and math.random() < share
end

--- Apply faults before the handler runs. May sleep, answer (429/5xx) or drop; may set
-- ngx.ctx.post_fault for faults that act on the reply (truncate, nonjson, ambiguous).
function M.before(op)
  local f = current()
  if not f or not matches(f, op) then return end
  if f.count then
    local used = misc:incr("fault_used", 1, 0)
    if used > f.count then return end
  end
  local ctx = ngx.ctx
  if f.latency_ms and f.latency_ms > 0 then
    ctx.fault = "latency"
    ngx.sleep(f.latency_ms / 1000)
  end
  local rl = f.rate_limit
  if rl then
    local hit
    if rl.every then
      local seq = misc:incr("fault_seq", 1, 0)
      hit = seq % rl.every == 0
    else
      hit = roll(rl.share)
    end
    if hit then
      ctx.fault = "rate_limit"
      return util.send(rl.status, { status = rl.status, msg = "API rate limit exceeded" },
        { ["Retry-After"] = tostring(rl.retry_after) })
    end
  end
  if roll(f.error_share) then
    local st = f.error_status or 500
    ctx.fault = "error"
    return util.send(st, { status = st, msg = st == 503 and "Service Unavailable" or "Internal Server Error" })
  end
  if roll(f.drop_share) then
    ctx.fault = "drop"
    return ngx.exit(444)
  end
  if roll(f.ambiguous_share) then ctx.post_fault = "ambiguous"
  elseif roll(f.truncate_share) then ctx.post_fault = "truncate"
  elseif roll(f.nonjson_share) then ctx.post_fault = "nonjson" end
end

-- request log (ring buffer) ---------------------------------------------------

local REDACT_HEADERS = { ["apim-accesstoken"] = true, ["apim-signature"] = true, authorization = true }

--- log_by_lua: append one redacted entry.
function M.log()
  local ctx = ngx.ctx
  if ctx.admin then return end
  local var = ngx.var
  local headers = {}
  for k, v in pairs(ngx.req.get_headers(30)) do
    if REDACT_HEADERS[k] then headers[k] = "<redacted>"
    elseif k:sub(1, 5) == "apim-" or k == "content-type" then headers[k] = v end
  end
  local body = ctx.body_json
  if body == nil and ctx.body and ctx.body ~= "" then body = "<" .. #ctx.body .. " bytes, not JSON>" end
  local status = ngx.status
  if ctx.fault == "drop" or ctx.fault == "ambiguous" then status = 444 end
  local seq = logd:incr("seq", 1, 0)
  local entry = {
    seq = seq,
    time = ngx.req.start_time(),
    method = ngx.req.get_method(),
    path = var.uri,
    query = var.args,
    op = ctx.op,
    app = ctx.app,
    status = status,
    code = ctx.code,
    fault = ctx.fault,
    ms = math.floor((ngx.now() - ngx.req.start_time()) * 1000 + 0.5),
    headers = headers,
    body = util.redact(body),
  }
  logd:set("e:" .. (seq % conf.cfg.log_size), cjson.encode(entry))
end

--- Entries with seq > since, oldest first (at most limit).
function M.entries(since, limit)
  since = since or 0
  local last = logd:get("seq") or 0
  local size = conf.cfg.log_size
  local first = math.max(since + 1, last - size + 1, 1)
  local out = {}
  for s = first, last do
    local e = logd:get("e:" .. (s % size))
    if e then
      local t = cjson.decode(e)
      if t and t.seq == s then out[#out + 1] = t end
    end
    if limit and #out >= limit then break end
  end
  return out, last
end

function M.clear_log()
  logd:flush_all()
end

return M
