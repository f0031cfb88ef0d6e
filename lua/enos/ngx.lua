--- enos inside nginx (Debian's libnginx-mod-http-lua or OpenResty).
--
--   local enos_ngx = require "enos.ngx"
--   -- init_by_lua* (no network there) or lazily in the worker:
--   local client = assert(enos_ngx.client { endpoint = …, access_key = …, secret_key = …, org_id = …,
--                                           shared_dict = "enos_tokens" })
--   -- content_by_lua*, access_by_lua*, rewrite_by_lua*, ngx.timer.at callbacks:
--   local r, err = client:replace_device { assetId = …, newDeviceKey = … }
--
-- The client does its I/O through cosockets (`enos.transport.ngx`), so a call yields to nginx and the
-- worker keeps serving other requests. With `shared_dict`, the access token lives in that
-- `lua_shared_dict`, shared by every worker, and only one worker at a time fetches or refreshes it
-- (the others wait for its result). Nothing is fetched when a module is required or a client created.
-- @module enos.ngx

-- luacheck: globals ngx
local client_mod = require "enos.client"
local errors = require "enos.errors"
local tngx = require "enos.transport.ngx"

local M = {}

local function phase()
  local n = rawget(_G, "ngx")
  return type(n) == "table" and n.get_phase and n.get_phase() or nil
end

--- True when running inside nginx.
-- @function in_nginx
M.in_nginx = tngx.in_nginx

--- Checks that the current phase allows EnOS calls (cosockets).
-- @return true | nil, err (an enos error, kind `config`, with `phase`)
function M.check_phase()
  local ok, e = tngx.check_phase()
  if ok then return true end
  return nil, errors.new("config", e.message, { phase = e.phase })
end

--- A sleep for `enos.workflow` options (`opts.sleep`): yields to nginx where it may, never blocks it.
function M.sleep(seconds)
  if seconds <= 0 then return end
  if tngx.COSOCKET_PHASES[phase()] then return ngx.sleep(seconds) end
  error("enos.ngx.sleep: cannot sleep in nginx's '" .. tostring(phase()) .. "' phase", 2)
end

-- ------------------------------------------------------------------ shared token cache

local Cache = {}
Cache.__index = Cache
Cache.__name = "enos.ngx.token_cache"

function Cache:__tostring() return "enos.ngx.token_cache(" .. self.name .. ")" end

local REFRESH_MARGIN_MS = 600 * 1000

-- Same rule as enos.client: refresh 10 minutes (or half the lifetime) before expiry.
local function fresh_enough(tok, now)
  local margin = math.min(REFRESH_MARGIN_MS, tok.ttl * 1000 / 2)
  return now < tok.expires_at - margin
end

local function key_of(client)
  return "enos:token:" .. tostring(client.endpoint) .. "|" .. tostring(client.access_key)
end

local function decode(v)
  if type(v) ~= "string" then return nil end
  local exp, ttl, value = v:match("^(%d+)|(%d+)|(.+)$")
  if not exp then return nil end
  return { value = value, expires_at = tonumber(exp), ttl = tonumber(ttl) }
end

local owner_seq = 0

--- A token cache in a `lua_shared_dict` (declare it in nginx.conf: `lua_shared_dict enos_tokens 1m;`).
-- Implements the client's `token_cache` protocol: `get(client)` → {value, expires_at, ttl} | nil and
-- `set(client, tok | nil [, rejected value])`, plus `abort(client)` after a failed fetch. When the cached token is missing
-- or due for refresh, `get` lets exactly one caller (across all workers) go and fetch: it takes a
-- lock (`shdict:add` with an expiry, so a crashed holder cannot wedge the others) and returns the
-- stale token (or nil); every other caller waits, yielding, until the new token is stored or the
-- lock is gone, and then returns what is stored.
-- opts: lock_timeout (s, how long a holder may keep the lock; default the client's timeout +
-- connect timeout), wait_step (s, poll interval; default 0.01).
function M.token_cache(dict_name, opts)
  if type(dict_name) ~= "string" then error("enos.ngx.token_cache: a lua_shared_dict name is required", 2) end
  opts = opts or {}
  local dict = rawget(_G, "ngx") and ngx.shared and ngx.shared[dict_name]
  if not dict then
    error("enos.ngx.token_cache: no lua_shared_dict '" .. dict_name .. "' (declare it in nginx.conf: " ..
      "lua_shared_dict " .. dict_name .. " 1m;)", 2)
  end
  return setmetatable({
    name = dict_name, dict = dict, lock_timeout = opts.lock_timeout, wait_step = opts.wait_step or 0.01,
    owners = setmetatable({}, { __mode = "k" }),
    stats = { gets = 0, hits = 0, locks = 0, waits = 0 },
  }, Cache)
end

local function now_ms(client)
  return (client.clock or function() return ngx.now() * 1000 end)()
end

function Cache:_release(client)
  local id = self.owners[client]
  if not id then return end
  self.owners[client] = nil
  local lk = key_of(client) .. ":lock"
  if self.dict:get(lk) == id then self.dict:delete(lk) end
end

--- Returns a cached token, or nil when the caller should fetch one (it then holds the refresh lock).
function Cache:get(client)
  self.stats.gets = self.stats.gets + 1
  local key = key_of(client)
  local tok = decode(self.dict:get(key))
  if tok and fresh_enough(tok, now_ms(client)) then
    self.stats.hits = self.stats.hits + 1
    return tok
  end
  if self.owners[client] then return tok end        -- this worker already holds the lock for it
  local lk = key .. ":lock"
  local hold = self.lock_timeout or ((client.timeout or 30) + (client.connect_timeout or 10))
  owner_seq = owner_seq + 1
  local id = string.format("%d:%d", ngx.worker.pid(), owner_seq)
  local won = self.dict:add(lk, id, hold)
  if won then
    -- the previous holder may have stored its token and let go between our read and our add
    local now_tok = decode(self.dict:get(key))
    if now_tok and fresh_enough(now_tok, now_ms(client)) then
      self.dict:delete(lk)
      self.stats.hits = self.stats.hits + 1
      return now_tok
    end
    self.stats.locks = self.stats.locks + 1
    self.owners[client] = id
    return now_tok
  end
  -- someone else is fetching: wait for its token (or for its lock to go away)
  if not tngx.COSOCKET_PHASES[phase()] then return tok end
  self.stats.waits = self.stats.waits + 1
  ngx.update_time()
  local deadline = ngx.now() + hold
  while ngx.now() < deadline do
    ngx.sleep(self.wait_step)
    local t = decode(self.dict:get(key))
    if t and fresh_enough(t, now_ms(client)) then return t end
    if not self.dict:get(lk) then return t end
  end
  return decode(self.dict:get(key))
end

--- Stores a token for every worker, and releases this caller's refresh lock. `set(client, nil, rejected)`
-- drops the stored token if it is still `rejected` (another worker may have stored a newer one meanwhile).
function Cache:set(client, tok, rejected)
  local key = key_of(client)
  if tok == nil then
    local cur = rejected and decode(self.dict:get(key))
    if not (cur and cur.value ~= rejected) then self.dict:delete(key) end
  else
    local ttl_s = (tok.expires_at - now_ms(client)) / 1000
    if ttl_s > 0 then
      local ok, e = self.dict:set(key, string.format("%d|%d|%s", tok.expires_at, tok.ttl or 7200, tok.value), ttl_s)
      if not ok then ngx.log(ngx.WARN, "enos: cannot store the token in lua_shared_dict ", self.name, ": ", e) end
    end
  end
  self:_release(client)
end

--- Releases the refresh lock after a failed fetch (the next caller tries).
function Cache:abort(client) self:_release(client) end

-- ------------------------------------------------------------------ client

local NGX_OPTIONS = { shared_dict = true, pool_size = true, keepalive_timeout = true }

--- Creates an enos client that does its I/O through cosockets.
-- opts: every `enos.client` option, plus `shared_dict` (name of a lua_shared_dict for the token),
-- `pool_size`, `keepalive_timeout` (cosocket pool), and `transport` = "ngx" (default) | "curl"
-- (the blocking libcurl transport: stalls the worker, for comparison only) | a transport object.
-- May be called in init_by_lua* (it does no I/O); calls must then be made from a cosocket phase.
-- @return client | nil, err
function M.client(opts)
  if type(opts) ~= "table" then error("enos.ngx.client: options must be a table", 2) end
  local copts = {}
  for k, v in pairs(opts) do if not NGX_OPTIONS[k] then copts[k] = v end end
  local topts = {
    timeout = opts.timeout, connect_timeout = opts.connect_timeout, verify_tls = opts.verify_tls,
    user_agent = opts.user_agent, max_body = opts.max_body, cafile = opts.cafile, capath = opts.capath,
    pool_size = opts.pool_size, keepalive_timeout = opts.keepalive_timeout,
  }
  local t = opts.transport
  if t == nil or t == "ngx" then
    copts.transport = tngx.new(topts)
  elseif t == "curl" then
    copts.transport = require("enos.core").easy(topts)
  elseif type(t) == "string" then
    return nil, errors.new("config", "transport must be \"ngx\", \"curl\" or a transport object", { field = "transport" })
  end
  if opts.shared_dict ~= nil then
    if type(opts.shared_dict) ~= "string" then
      return nil, errors.new("config", "shared_dict must be the name of a lua_shared_dict", { field = "shared_dict" })
    end
    local ok, cache = pcall(M.token_cache, opts.shared_dict)
    if not ok then
      return nil, errors.new("config", (tostring(cache):gsub("^[^:]*:%d+: ", "")), { field = "shared_dict" })
    end
    copts.token_cache = cache
  end
  return client_mod.new(copts)
end

return M
