-- Helpers for the nginx specs and bench: run examples/nginx/nginx.conf (templated with ports, paths and
-- the simulator's CA) and small nginx servers with custom Lua, on free 127.0.0.1 ports.
-- Load with dofile("spec/60_ngx_helper.lua") from the repo root.
local H = dofile("spec/helpers.lua")

local M = { H = H }

M.root = (H.sh("pwd"):gsub("%s+$", ""))

local function q(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end
M.q = q

-- Replaces `from` (plain text) exactly once; fails loudly when the example drifted.
local function replace_once(text, from, to)
  local a, b = text:find(from, 1, true)
  assert(a, "examples/nginx/nginx.conf: cannot find " .. from)
  assert(not text:find(from, b + 1, true), "examples/nginx/nginx.conf: " .. from .. " appears twice")
  return text:sub(1, a - 1) .. to .. text:sub(b + 1)
end

--- The example nginx.conf adapted to this checkout: opts.port, opts.ca_file, opts.workers.
function M.example_conf(opts)
  local root = M.root
  local conf = H.readfile(root .. "/examples/nginx/nginx.conf")
  conf = replace_once(conf, "worker_processes auto;", ("worker_processes %d;"):format(opts.workers or 1))
  conf = replace_once(conf, "listen 127.0.0.1:8080;", ("listen 127.0.0.1:%d;"):format(opts.port))
  conf = replace_once(conf,
    "/usr/local/share/lua/5.1/?.lua;/usr/local/share/lua/5.1/?/init.lua;/etc/enos/lua/?.lua;;",
    ("%s/lua/?.lua;%s/lua/?/init.lua;%s/examples/nginx/?.lua;;"):format(root, root, root))
  conf = replace_once(conf, "/usr/local/lib/lua/5.1/?.so;;", root .. "/build/luajit/?.so;;")
  conf = replace_once(conf, "/etc/ssl/certs/ca-certificates.crt", opts.ca_file or "/etc/ssl/certs/ca-certificates.crt")
  conf = replace_once(conf, "access_log logs/access.log;", "access_log off;")
  if opts.worker_connections then
    conf = replace_once(conf, "worker_connections 1024;", ("worker_connections %d;"):format(opts.worker_connections))
  end
  return conf
end

local function wait_up(url)
  for _ = 1, 100 do
    local ok = os.execute(("curl -sk -o /dev/null --max-time 1 %s 2>/dev/null"):format(q(url)))
    if ok == true or ok == 0 then return true end
    os.execute("sleep 0.05")
  end
  return false
end

--- A fresh prefix directory.
function M.prefix()
  local prefix = H.tmpdir()
  H.sh("mkdir -p " .. prefix .. "/logs")
  return prefix
end


-- Starts nginx with config text `conf` and environment `env` (map). Returns {url, prefix, port, stop, log}.
function M.start_nginx(conf, port, env, probe, prefix)
  prefix = prefix or M.prefix()
  H.writefile(prefix .. "/nginx.conf", H.nginx_user_line() .. conf)
  local vars = {}
  for k, v in pairs(env or {}) do vars[#vars + 1] = k .. "=" .. q(v) end
  local srv = { url = ("http://127.0.0.1:%d"):format(port), prefix = prefix, port = port }
  function srv.stop()
    if srv.stopped then return end
    srv.stopped = true
    H.stop_pidfile(prefix .. "/logs/nginx.pid")
    if not os.getenv("ENOS_NGX_KEEP") then os.execute("rm -rf " .. q(prefix)) end
  end
  function srv.log() return H.readfile(prefix .. "/logs/error.log") end
  local cmd = ("env %s nginx -p %s -c %s/nginx.conf -e %s/logs/error.log 2>&1"):format(table.concat(vars, " "),
    q(prefix), q(prefix), q(prefix))
  local p = io.popen(cmd)
  local out = p:read("*a")
  local ok, _, code = p:close()
  if not (ok == true or code == 0) then
    local log = io.open(prefix .. "/logs/error.log") and H.readfile(prefix .. "/logs/error.log") or ""
    srv.stop()
    error("nginx did not start: " .. out .. log, 2)
  end
  if not wait_up(srv.url .. (probe or "/health")) then
    local log = srv.log()
    srv.stop()
    error("nginx did not answer: " .. log, 2)
  end
  return srv
end

--- Starts the example endpoint against simulator handle `s`. opts: workers, env (extra/overrides).
function M.start_example(s, opts)
  opts = opts or {}
  local port = H.free_port()
  local prefix = M.prefix()
  local ca = prefix .. "/ca.pem"
  H.sh(("cp %s %s"):format(q(s.ca_file), q(ca)))
  local conf = M.example_conf { port = port, ca_file = ca, workers = opts.workers,
    worker_connections = opts.worker_connections }
  local env = {
    -- nginx checks certificates against host names only: the simulator's has DNS:localhost
    ENOS_ENDPOINT = (s.url:gsub("//127%.0%.0%.1:", "//localhost:")),
    ENOS_ACCESS_KEY = s.app.access_key, ENOS_ORG_ID = opts.org_id or "o15724268424841",
    ENOS_SECRET_KEY_FILE = opts.secret_key_file, ENOS_PRIVATE_KEY_FILE = opts.private_key_file,
    ENOS_CA_FILE = ca,
  }
  for k, v in pairs(opts.env or {}) do env[k] = v ~= false and v or nil end
  return M.start_nginx(conf, port, env, nil, prefix)
end

--- A bare nginx (1 worker) serving `server_body` (nginx config text inside server {}), with `http_extra`
-- inside http {}. Lua path: this checkout. Returns the server table of start_nginx.
function M.start_plain(server_body, http_extra, opts)
  opts = opts or {}
  local port = H.free_port()
  local root = M.root
  local conf = ([[
load_module /usr/lib/nginx/modules/ndk_http_module.so;
load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;
worker_processes %d;
pid logs/nginx.pid;
error_log logs/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  lua_package_path "%s/lua/?.lua;%s/lua/?/init.lua;;";
  lua_package_cpath "%s/build/luajit/?.so;;";
  lua_socket_log_errors off;
  %s
  server {
    listen 127.0.0.1:%d;
    location = /health { return 200 "ok"; }
    %s
  }
}
]]):format(opts.workers or 1, root, root, root, http_extra or "", port, server_body)
  return M.start_nginx(conf, port, opts.env, "/health")
end

--- HTTP with the curl command: status, body, headers (see sim_helper.http).
function M.http(req)
  local sim = dofile("spec/sim_helper.lua")
  return sim.http(req)
end

return M
