-- The servers the fault matrix (spec/70_fault_matrix_spec.lua) walks, all on 127.0.0.1, on free ports:
--
--   * the simulator (plain HTTP) with an RSA key pair for the app, so secrets are encrypted (V2.4);
--   * one extra nginx with
--       - a "front" that passes every call to the simulator and mangles replies to replaceDevice
--         AFTER the simulator applied it (the reply is lost on the way back, the replace happened).
--         The endpoint path chooses the mangling: <front>/f/<mode>-<n>-<nonce>, the first n replaces
--         (0 = all) of that prefix are mangled. Modes: stall (headers and half the body, then silence),
--         drip (one byte every 200 ms), huge (9 MiB body), envelope (HTTP 200 with an unexpected JSON
--         shape), r429 (429 without Retry-After, NOT applied), and hostile replies: otherasset (names
--         asset A002), otherkey (names key OLD-A002), nosecret (no secret), badsecret (one that does not
--         decrypt);
--       - four TLS servers that proxy to the simulator: good (certificate from the trusted CA), untrusted
--         (another CA), wronghost (trusted CA, name wrong-host.invalid), expired (trusted CA, notAfter in 2020);
--   * a listening socket whose accept queue is full (connect timeout), and a port nobody listens on.
--
-- Returns an environment table; env:stop() stops everything it started.
local H = require "helpers"
local sim = dofile("spec/sim_helper.lua")

local M = {}

local function sh(cmd) return H.sh(cmd) end

-- A CA, and server certificates signed by it (EC P-256). Returns paths.
local function make_certs(dir)
  local function ca(name)
    sh(("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3 -subj /CN=%s "
      .. "-keyout %s/%s.key -out %s/%s.pem"):format(name, dir, name, dir, name))
  end
  ca("trusted-ca")
  ca("other-ca")
  local function csr(name, san)
    sh(("openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=%s "
      .. "-keyout %s/%s.key -out %s/%s.csr"):format(name, dir, name, dir, name))
    H.writefile(dir .. "/" .. name .. ".ext", "subjectAltName=" .. san .. "\n")
  end
  local function sign(name, caname)
    sh(("openssl x509 -req -in %s/%s.csr -CA %s/%s.pem -CAkey %s/%s.key -CAcreateserial -days 2 "
      .. "-extfile %s/%s.ext -out %s/%s.pem"):format(dir, name, dir, caname, dir, caname, dir, name, dir, name))
  end
  csr("good", "IP:127.0.0.1")
  sign("good", "trusted-ca")
  csr("untrusted", "IP:127.0.0.1")
  sign("untrusted", "other-ca")
  csr("wronghost", "DNS:wrong-host.invalid")
  sign("wronghost", "trusted-ca")
  -- expired: `openssl ca` is the one command of OpenSSL 3.0 that takes explicit validity dates
  csr("expired", "IP:127.0.0.1")
  sh(("mkdir -p %s/ca-db && : > %s/ca-db/index.txt && echo 01 > %s/ca-db/serial"):format(dir, dir, dir))
  H.writefile(dir .. "/ca.cnf", ([[
[ ca ]
default_ca = CA_default
[ CA_default ]
dir = %s/ca-db
database = $dir/index.txt
new_certs_dir = $dir
serial = $dir/serial
default_md = sha256
policy = policy_any
copy_extensions = copy
unique_subject = no
[ policy_any ]
commonName = supplied
[ ext ]
subjectAltName = IP:127.0.0.1
]]):format(dir))
  sh(("openssl ca -batch -config %s/ca.cnf -extensions ext -cert %s/trusted-ca.pem -keyfile %s/trusted-ca.key "
    .. "-startdate 20200101000000Z -enddate 20200102000000Z -in %s/expired.csr -out %s/expired.pem")
    :format(dir, dir, dir, dir, dir))
  return { ca = dir .. "/trusted-ca.pem", other_ca = dir .. "/other-ca.pem" }
end

-- The nginx "front": Lua that proxies to the simulator through an internal location and mangles
-- the reply of replaceDevice after the simulator handled it.
local FRONT = [[
    location ~ ^/f/([^/]+)(/.*)$ {
      content_by_lua_block {
        local prefix, path = ngx.var[1], ngx.var[2]
        local mode, n = prefix:match("^(%w+)%-(%d+)%-")
        n = tonumber(n) or 0
        ngx.req.read_body()
        local body = ngx.req.get_body_data()
        local args = ngx.req.get_uri_args()
        local hit = false
        if args.action == "replaceDevice" then
          local used = ngx.shared.front:incr(prefix, 1, 0)
          hit = n == 0 or used <= n
        end
        if hit and mode == "r429" then
          ngx.status = 429
          ngx.header["Content-Type"] = "application/json"
          ngx.print('{"status":429,"msg":"API rate limit exceeded"}')
          return
        end
        local res = ngx.location.capture("/__up" .. path,
          { method = ngx["HTTP_" .. ngx.req.get_method()], body = body, args = ngx.var.args })
        local b = res.body or ""
        if not hit then
          ngx.status = res.status
          for _, h in ipairs { "Content-Type", "Retry-After" } do
            if res.header[h] then ngx.header[h] = res.header[h] end
          end
          ngx.print(b)
          return
        end
        ngx.status = 200
        ngx.header["Content-Type"] = "application/json;charset=UTF-8"
        if mode == "stall" then
          ngx.header["Content-Length"] = #b
          ngx.print(b:sub(1, math.floor(#b / 2)))
          ngx.flush(true)
          ngx.sleep(4)
        elseif mode == "drip" then
          ngx.header["Content-Length"] = #b
          for i = 1, math.min(#b, 30) do
            ngx.print(b:sub(i, i))
            if not ngx.flush(true) then return end
            ngx.sleep(0.2)
          end
        elseif mode == "huge" then
          ngx.print(b:sub(1, -2), ',"padding":"', string.rep("x", 9 * 1024 * 1024), '"}')
        elseif mode == "envelope" then
          ngx.print('{"result":', b, ',"success":true}')
        else
          -- hostile replies: the replace was applied, the reply lies about what it did
          local cjson = require "cjson"
          local doc = cjson.decode(b)
          local d = type(doc) == "table" and type(doc.data) == "table" and doc.data or {}
          if mode == "otherasset" then d.assetId = "A002"
          elseif mode == "otherkey" then d.deviceKey = "OLD-A002"
          elseif mode == "nosecret" then d.deviceSecret, d.sessionKey = nil, nil
          elseif mode == "badsecret" then d.deviceSecret, d.sessionKey = "AAAA", "BBBB" end
          ngx.print((cjson.encode(doc):gsub("\\/", "/")))
        end
      }
    }
    location /__up/ {
      internal;
      rewrite ^/__up(/.*)$ $1 break;
      proxy_pass http://127.0.0.1:SIM_PORT;
    }
]]

local function start_nginx(prefix, sim_port, certs_dir)
  local ports = { front = H.free_port() }
  local servers = { ("  server {\n    listen 127.0.0.1:%d;\n%s  }\n"):format(ports.front, (FRONT:gsub("SIM_PORT", tostring(sim_port)))) }
  for _, name in ipairs { "good", "untrusted", "wronghost", "expired" } do
    ports[name] = H.free_port()
    servers[#servers + 1] = ([[
  server {
    listen 127.0.0.1:%d ssl;
    ssl_certificate %s/%s.pem;
    ssl_certificate_key %s/%s.key;
    location / { proxy_pass http://127.0.0.1:%d; }
  }
]]):format(ports[name], certs_dir, name, certs_dir, name, sim_port)
  end
  H.run_nginx(prefix, ([[
  lua_shared_dict front 1m;
  client_body_buffer_size 1m;
  subrequest_output_buffer_size 1m;
%s]]):format(table.concat(servers)), ("http://127.0.0.1:%d/"):format(ports.front), "error")
  return ports
end

--- Starts everything. opts.config: extra simulator config merged over ours.
function M.start(opts)
  opts = opts or {}
  local env = { dir = H.tmpdir(), kp = H.keypair(), nonce = 0 }
  local ok, err = pcall(function()
    local cfg = { apps = { { access_key = "fault-ak", secret_key = "fault-sk", public_key_file = env.kp.public_file } } }
    for k, v in pairs(opts.config or {}) do cfg[k] = v end
    env.sim = sim.start { config = cfg }
    env.certs = make_certs(env.dir)
    env.ngx_prefix = env.dir .. "/nginx"
    env.ports = start_nginx(env.ngx_prefix, env.sim.port, env.dir)
    env.front = ("http://127.0.0.1:%d"):format(env.ports.front)
    env.tls = {}
    for _, name in ipairs { "good", "untrusted", "wronghost", "expired" } do
      env.tls[name] = ("https://127.0.0.1:%d"):format(env.ports[name])
    end
    -- connect timeout: a listener that never accepts, its queue filled by connections of our own
    local socket = require "socket"
    local bh = socket.tcp()
    bh:setoption("reuseaddr", true)
    assert(bh:bind("127.0.0.1", 0))
    assert(bh:listen(0))
    local _, port = bh:getsockname()
    env.blackhole, env.fillers = bh, {}
    for i = 1, 3 do
      local c = socket.tcp()
      c:settimeout(0)
      c:connect("127.0.0.1", port)
      env.fillers[i] = c
    end
    env.blackhole_url = "http://127.0.0.1:" .. port
    env.refused_url = "http://127.0.0.1:" .. H.free_port()
  end)
  if not ok then M.stop(env) error(err, 0) end
  return setmetatable(env, { __index = M })
end

--- A fresh front endpoint mangling the first n replaces (0: all) with mode.
function M.front_url(env, mode, n)
  env.nonce = env.nonce + 1
  return ("%s/f/%s-%d-%d"):format(env.front, mode, n or 0, env.nonce)
end

function M.stop(env)
  if env.stopped then return end
  env.stopped = true
  if env.sim then env.sim:stop() end
  if env.ngx_prefix then H.stop_pidfile(env.ngx_prefix .. "/nginx.pid") end
  for _, c in ipairs(env.fillers or {}) do c:close() end
  if env.blackhole then env.blackhole:close() end
  if env.dir then os.execute("rm -rf " .. env.dir) end
end

return M
