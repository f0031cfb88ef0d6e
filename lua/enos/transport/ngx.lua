--- The nginx cosocket transport: `transport:send(req) -> res | nil, err` on `ngx.socket.tcp`.
--
-- HTTP/1.1 with keep-alive through the cosocket pool (one pool per scheme, host and port), TLS with
-- `sslhandshake` and certificate verification (the CA list is nginx's `lua_ssl_trusted_certificate`),
-- a total deadline per request, Content-Length, chunked and read-until-close replies, the same reply
-- cap (8 MiB) and error kinds as the libcurl transport: `timeout`, `tls`, `transport` (with
-- `request_sent`), `protocol` (reply too large or malformed), `config` (bad URL, wrong nginx phase).
-- It yields to nginx while it waits, so it never blocks a worker. Requiring it outside nginx is fine;
-- only `send` needs nginx.
-- @module enos.transport.ngx
local M = {}

local DEFAULT_MAX_BODY = 8 * 1024 * 1024
local MAX_HEADER_BYTES = 64 * 1024
local CHUNK_READ = 64 * 1024

--- nginx phases in which cosockets (and ngx.sleep) are available.
M.COSOCKET_PHASES = {
  rewrite = true, access = true, content = true, timer = true,
  ssl_cert = true, ssl_session_fetch = true, ssl_client_hello = true,
}

local function err(kind, message, fields)
  local e = { kind = kind, message = message }
  if fields then for k, v in pairs(fields) do e[k] = v end end
  return e
end

--- True when running inside nginx's Lua module (the `ngx` API is there).
function M.in_nginx()
  local n = rawget(_G, "ngx")
  return type(n) == "table" and type(n.get_phase) == "function" and type(n.socket) == "table"
end

--- Checks that the current nginx phase allows cosockets.
-- @return true | nil, err (kind `config`, names the phase)
function M.check_phase()
  if not M.in_nginx() then
    return nil, err("config", "enos.transport.ngx: not running inside nginx (no ngx API)")
  end
  local phase = ngx.get_phase()
  if M.COSOCKET_PHASES[phase] then return true end
  return nil, err("config", "enos: EnOS calls cannot run in nginx's '" .. tostring(phase) .. "' phase " ..
    "(no cosockets there, and a blocking call would stall the worker); call from rewrite_by_lua*, " ..
    "access_by_lua*, content_by_lua* or an ngx.timer.at callback", { phase = phase })
end

-- ------------------------------------------------------------------ URL

--- Splits an http(s) URL: {scheme, host, port, authority, target, tls} | nil, err (kind config).
function M.parse_url(url)
  if type(url) ~= "string" then return nil, err("config", "url must be a string") end
  local scheme, authority, rest = url:match("^(%a[%w+.-]*)://([^/?#]*)(.*)$")
  if not scheme then return nil, err("config", "bad URL: " .. url) end
  scheme = scheme:lower()
  if scheme ~= "http" and scheme ~= "https" then
    return nil, err("config", "unsupported URL scheme '" .. scheme .. "' (http or https)")
  end
  if authority == "" or authority:find("@", 1, true) or authority:find("[%s%c]") then
    return nil, err("config", "bad URL host: " .. url)
  end
  local host, port
  if authority:sub(1, 1) == "[" then
    host, port = authority:match("^%[([%x:.]+)%]:?(%d*)$")
  else
    host, port = authority:match("^([^:]+):?(%d*)$")
  end
  if not host then return nil, err("config", "bad URL host: " .. url) end
  local tls = scheme == "https"
  port = tonumber(port ~= "" and port or nil) or (tls and 443 or 80)
  if port < 1 or port > 65535 then return nil, err("config", "bad URL port: " .. url) end
  rest = rest:gsub("#.*$", "")
  if rest:find("[%s%c]") then return nil, err("config", "URL contains spaces or control characters") end
  if rest == "" or rest:sub(1, 1) == "?" then rest = "/" .. rest end
  return { scheme = scheme, host = host, port = port, authority = authority, target = rest, tls = tls }
end

-- ------------------------------------------------------------------ transport

local Transport = {}
Transport.__index = Transport
Transport.__name = "enos.transport.ngx"

--- Creates a transport. opts: timeout (s, total per request, default 30), connect_timeout (s, 10),
-- verify_tls (default true), user_agent, max_body (bytes, default 8 MiB), pool_size (idle connections
-- kept per host, default 32), keepalive_timeout (s, idle time in the pool, default 60).
-- `cafile`/`capath` cannot be set per socket in nginx: use `lua_ssl_trusted_certificate`.
function M.new(opts)
  opts = opts or {}
  local max_body = opts.max_body or DEFAULT_MAX_BODY
  if type(max_body) ~= "number" or max_body < 1024 or max_body > 1024 * 1024 * 1024 then
    error("enos.transport.ngx: option 'max_body' must be 1 KiB .. 1 GiB", 2)
  end
  return setmetatable({
    timeout = opts.timeout or 30,
    connect_timeout = opts.connect_timeout or 10,
    verify_tls = opts.verify_tls ~= false,
    user_agent = opts.user_agent or ("enos (nginx cosocket)"),
    max_body = max_body,
    pool_size = opts.pool_size or 32,
    keepalive_ms = math.floor((opts.keepalive_timeout or 60) * 1000),
    cafile = opts.cafile,
    stats = { requests = 0, new_connections = 0, reused = 0 },
  }, Transport)
end

function Transport:__tostring()
  return string.format("enos.transport.ngx(%d requests, %d new connections)", self.stats.requests,
    self.stats.new_connections)
end

-- Milliseconds left before the deadline (at least 1).
local function remaining(deadline)
  ngx.update_time()
  local ms = math.floor((deadline - ngx.now()) * 1000)
  return ms > 0 and ms or 0
end

local function sock_error(e, phase, sent)
  if e == "timeout" then
    return err("timeout", "timed out " .. phase, { request_sent = sent })
  end
  return err("transport", phase .. ": " .. tostring(e), { request_sent = sent })
end

local function build_request(self, req, u)
  local method = req.method or "GET"
  if type(method) ~= "string" or not method:match("^%u+$") then
    return nil, err("config", "bad HTTP method")
  end
  local body = req.body
  if body ~= nil and type(body) ~= "string" then return nil, err("config", "body must be a string") end
  local host_hdr = u.authority
  local lines = { method .. " " .. u.target .. " HTTP/1.1", "Host: " .. host_hdr }
  local have_ua, have_accept = false, false
  for k, v in pairs(req.headers or {}) do
    k, v = tostring(k), tostring(v)
    if k:find("[%c%s:]") or v:find("[\r\n%z]") then
      return nil, err("config", "header '" .. k:gsub("[%c]", "?") .. "' has a bad name or a line break in its value")
    end
    local lk = k:lower()
    -- framing headers (host, content-length, connection, transfer-encoding) are ours
    if lk ~= "host" and lk ~= "content-length" and lk ~= "connection" and lk ~= "transfer-encoding" then
      if lk == "user-agent" then have_ua = true elseif lk == "accept" then have_accept = true end
      lines[#lines + 1] = k .. ": " .. v
    end
  end
  if not have_ua then lines[#lines + 1] = "User-Agent: " .. self.user_agent end
  if not have_accept then lines[#lines + 1] = "Accept: */*" end
  if body or (method ~= "GET" and method ~= "HEAD") then
    lines[#lines + 1] = "Content-Length: " .. #(body or "")
  end
  lines[#lines + 1] = "Connection: keep-alive"
  lines[#lines + 1] = ""
  lines[#lines + 1] = body or ""
  return table.concat(lines, "\r\n"), method
end

-- Reads the status line and headers. Returns status, headers, http_minor | nil, err, got_bytes.
local function read_head(sock, deadline)
  local headers, total = {}, 0
  local status, minor
  while true do
    -- 1xx interim replies are skipped (we never send Expect, but a server may still send one)
    sock:settimeout(math.max(remaining(deadline), 1))
    local line, e = sock:receive("*l")
    if not line then return nil, e, total > 0 end
    total = total + #line + 2
    local mi, st = line:match("^HTTP/1%.(%d) (%d%d%d)")
    if not st then return nil, "bad status line", true, true end
    status, minor = tonumber(st), tonumber(mi)
    for k in pairs(headers) do headers[k] = nil end
    while true do
      sock:settimeout(math.max(remaining(deadline), 1))
      local h, he = sock:receive("*l")
      if not h then return nil, he, true end
      total = total + #h + 2
      if total > MAX_HEADER_BYTES then return nil, "reply headers larger than 64 KiB", true, true end
      if h == "" then break end
      local name, value = h:match("^([^:%s]+):%s*(.-)%s*$")
      if not name then return nil, "bad header line", true, true end
      name = name:lower()
      local prev = headers[name]
      headers[name] = prev and (prev .. ", " .. value) or value
    end
    if status >= 200 or status < 100 then break end
  end
  return status, headers, minor
end

-- Reads a body of known length, a chunked body, or up to close. Returns body, reusable | nil, err.
local function read_body(self, sock, deadline, headers, status, method)
  if method == "HEAD" or status == 204 or status == 304 then return "", true end
  local te = headers["transfer-encoding"]
  local cap = self.max_body
  if te and te:lower():find("chunked", 1, true) then
    local parts, size = {}, 0
    while true do
      sock:settimeout(math.max(remaining(deadline), 1))
      local line, e = sock:receive("*l")
      if not line then return nil, e end
      local n = tonumber(line:match("^%s*(%x+)"), 16)
      if not n then return nil, "bad chunk size line", true end
      if n == 0 then
        repeat                                -- trailers
          sock:settimeout(math.max(remaining(deadline), 1))
          line, e = sock:receive("*l")
          if not line then return nil, e end
        until line == ""
        return table.concat(parts), true
      end
      size = size + n
      if size > cap then return nil, "reply body larger than " .. cap .. " bytes", true end
      sock:settimeout(math.max(remaining(deadline), 1))
      local data
      data, e = sock:receive(n)
      if not data then return nil, e end
      parts[#parts + 1] = data
      sock:settimeout(math.max(remaining(deadline), 1))
      local crlf
      crlf, e = sock:receive("*l")
      if not crlf then return nil, e end
      if crlf ~= "" then return nil, "bad chunk terminator", true end
    end
  end
  local cl = headers["content-length"]
  if cl then
    local n = tonumber(cl:match("^%s*(%d+)%s*$"))
    if not n then return nil, "bad Content-Length", true end
    if n > cap then return nil, "reply body larger than " .. cap .. " bytes", true end
    if n == 0 then return "", true end
    sock:settimeout(math.max(remaining(deadline), 1))
    local data, e = sock:receive(n)
    if not data then return nil, e end
    return data, true
  end
  -- no framing: read until the server closes
  local parts, size = {}, 0
  while true do
    sock:settimeout(math.max(remaining(deadline), 1))
    local data, e = sock:receiveany(CHUNK_READ)
    if not data then
      if e == "closed" then return table.concat(parts), false end
      return nil, e
    end
    size = size + #data
    if size > cap then return nil, "reply body larger than " .. cap .. " bytes", true end
    parts[#parts + 1] = data
  end
end

-- One attempt on one connection. Returns res | nil, err, retry_on_fresh.
function Transport:_attempt(u, wire, method, deadline, fresh)
  local sock = ngx.socket.tcp()
  local pool = (u.tls and "enos:https:" or "enos:http:") .. u.host .. ":" .. u.port
  if u.tls and not self.verify_tls then pool = pool .. ":noverify" end
  -- a pool name nothing is ever kept in: the connect cannot pick up an idle connection
  local connect_pool = fresh and (pool .. ":fresh") or pool
  local ctimeout = math.min(remaining(deadline), math.floor(self.connect_timeout * 1000))
  if ctimeout < 1 then return nil, err("timeout", "timed out before connecting", { request_sent = false }) end
  sock:settimeout(ctimeout)
  -- nginx's resolver does not read /etc/hosts; localhost is loopback by definition
  local addr = u.host:lower() == "localhost" and "127.0.0.1" or u.host
  local ok, e = sock:connect(addr, u.port, { pool = connect_pool, pool_size = self.pool_size })
  if not ok then
    if e == "timeout" then return nil, err("timeout", "timed out connecting to " .. u.authority, { request_sent = false }) end
    return nil, err("transport", "cannot connect to " .. u.authority .. ": " .. tostring(e), { request_sent = false })
  end
  local reused = (sock:getreusedtimes() or 0) > 0
  if reused then self.stats.reused = self.stats.reused + 1 else self.stats.new_connections = self.stats.new_connections + 1 end
  if u.tls and not reused then
    sock:settimeout(math.max(remaining(deadline), 1))
    -- (protected: lua-resty-core's sslhandshake can raise, an assertion, where verification fails in some
    -- ways, e.g. a certificate for another host name; that is a TLS failure like any other)
    local hok, sess, herr = pcall(sock.sslhandshake, sock, nil, u.host, self.verify_tls)
    if hok then e = herr else sess, e = nil, sess end
    if not sess then
      sock:close()
      if e == "timeout" then return nil, err("timeout", "timed out in the TLS handshake with " .. u.authority, { request_sent = false }) end
      local hint = ""
      if self.verify_tls and (u.host:match("^[%d.]+$") or u.host:find(":", 1, true)) then
        hint = " (nginx matches certificates against host names only: use the gateway's DNS name, not an IP address)"
      end
      return nil, err("tls", "TLS handshake with " .. u.authority .. " failed: " .. tostring(e) .. hint, { request_sent = false })
    end
  end
  sock:settimeout(math.max(remaining(deadline), 1))
  local sent
  sent, e = sock:send(wire)
  if not sent then
    sock:close()
    -- a pooled connection the server had closed: nothing reached it
    local retry = reused and e ~= "timeout"
    return nil, sock_error(e, "sending the request to " .. u.authority, true), retry
  end
  local status, headers, minor, malformed = read_head(sock, deadline)
  if not status then
    sock:close()
    local e2, got, bad = headers, minor, malformed
    if bad then return nil, err("protocol", "bad reply from " .. u.authority .. ": " .. tostring(e2)) end
    -- no byte of a reply on a reused connection: the server closed it while idle (libcurl retries too)
    local retry = reused and not got and e2 ~= "timeout"
    return nil, sock_error(e2, "reading the reply from " .. u.authority, true), retry
  end
  local body, reusable, bad = read_body(self, sock, deadline, headers, status, method)
  if not body then
    sock:close()
    if bad then
      return nil, err("protocol", "bad reply from " .. u.authority .. ": " .. tostring(reusable))
    end
    return nil, sock_error(reusable, "reading the reply body from " .. u.authority, true)
  end
  local conn = (headers["connection"] or ""):lower()
  local keep = reusable and not fresh and minor >= 1 and not conn:find("close", 1, true)
  if keep then
    sock:setkeepalive(self.keepalive_ms, self.pool_size)
  else
    sock:close()
  end
  return { status = status, headers = headers, body = body, new_connections = reused and 0 or 1 }
end

--- Sends one request. req: {method, url, headers, body, timeout (s), once}.
-- A request is never re-sent after it may have reached the server, except one without `once`
-- (idempotent) whose pooled connection turned out closed before any reply byte came back. A `once`
-- request (a replace) uses pooled connections too, but such a failure is returned, request_sent.
-- @return {status, headers (lower-case names), body} | nil, {kind, message, request_sent}
function Transport:send(req)
  if type(req) ~= "table" then error("enos.transport.ngx: send expects a request table", 2) end
  local ok, perr = M.check_phase()
  if not ok then return nil, perr end
  local u, uerr = M.parse_url(req.url)
  if not u then return nil, uerr end
  local wire, method = build_request(self, req, u)
  if not wire then return nil, method end
  local timeout = tonumber(req.timeout) or self.timeout
  ngx.update_time()
  local deadline = ngx.now() + timeout
  self.stats.requests = self.stats.requests + 1
  local res, e, retry = self:_attempt(u, wire, method, deadline, false)
  if not res and retry and not req.once and remaining(deadline) > 0 then
    res, e = self:_attempt(u, wire, method, deadline, true)
  end
  return res, e
end

--- Waits (yielding to nginx) until pred() is true or `max_s` seconds pass (default: the request
-- timeout plus the connect timeout). Used by the client's single-flight token fetch.
-- @return true when pred() became true, false on timeout or when the phase cannot sleep
function Transport:wait_for(pred, max_s)
  if pred() then return true end
  if not M.check_phase() then return false end
  ngx.update_time()
  local deadline = ngx.now() + (max_s or (self.timeout + self.connect_timeout))
  local step = 0.002
  while not pred() do
    if ngx.now() >= deadline then return false end
    ngx.sleep(step)
    step = math.min(step * 2, 0.05)
  end
  return true
end

--- Nothing to release: idle connections belong to nginx's pool.
function Transport.close() end

--- The transport for enos.client's automatic choice.
-- @return transport (inside nginx, in a cosocket phase) | nil, err (inside nginx, in a phase without
--   cosockets) | false (not inside nginx: use libcurl)
function M.auto(opts)
  if not M.in_nginx() then return false end
  local ok, e = M.check_phase()
  if not ok then return nil, e end
  return M.new(opts)
end

return M
