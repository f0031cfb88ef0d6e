--- enos-sim launcher: generate a prefix dir (config, nginx.conf, certificates) and start, stop or
-- query Debian's nginx running the simulator in sim/. Runs under Lua 5.4 and LuaJIT.
-- Crypto here only means certificates, made with the `openssl` command; never enos.core.
-- @module enos.sim
local cjson = require "cjson"
local config = require "enos.sim.config"

local M = { _NAME = "enos.sim" }

local NGINX_MODULES = "/usr/lib/nginx/modules"

-- helpers ------------------------------------------------------------------------------

local function q(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end
--- `s` quoted for a POSIX shell (single quotes).
-- @function shell_quote
-- @param s
M.shell_quote = q

-- os.execute returns differ between 5.1 and 5.2+: normalise to true/false.
local function run(cmd)
  local a, _, c = os.execute(cmd)
  if type(a) == "number" then return a == 0, a end
  return a == true, c
end

-- Run a shell command, return ok, combined output. (popen's close gives no status on 5.1.)
local function capture(cmd)
  local p = io.popen("(" .. cmd .. ") 2>&1; echo \"__rc=$?\"")
  local out = p:read("*a")
  p:close()
  local rc = tonumber(out:match("__rc=(%d+)%s*$"))
  out = out:gsub("__rc=%d+%s*$", "")
  return rc == 0, out
end

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() return true end
  return false
end

local function write_file(path, s, mode)
  local f, err = io.open(path, "wb")
  if not f then return nil, err end
  f:write(s)
  f:close()
  if mode then run("chmod " .. mode .. " " .. q(path)) end
  return true
end

local function read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

local socket_ok, socket = pcall(require, "socket")

local function sleep(s)
  if socket_ok then socket.sleep(s) else run("sleep " .. s) end
end

local function now()
  if socket_ok then return socket.gettime() end
  return os.time()
end

local function abspath(p)
  if p:sub(1, 1) == "/" then return p end
  local cwd = os.getenv("PWD")
  if not cwd then
    local h = io.popen("pwd")
    cwd = h:read("*l")
    h:close()
  end
  return (cwd .. "/" .. p):gsub("/%./", "/")
end

local function dirname(p)
  return p:match("^(.*)/[^/]*$") or "."
end

--- Is process `pid` alive (and not a zombie)?
function M.alive(pid)
  if not pid then return false end
  local ok = run("kill -0 " .. tonumber(pid) .. " 2>/dev/null")
  if not ok then return false end
  local st = read_file("/proc/" .. tonumber(pid) .. "/stat")
  if st and st:match("^%d+ %b() Z") then return false end
  return true
end

--- A free TCP port on 127.0.0.1 (bind to 0, read it, close).
function M.free_port()
  if not socket_ok then return nil, "luasocket is missing (Debian package lua-socket): run `make deps`" end
  local s = assert(socket.tcp())
  s:setoption("reuseaddr", false)
  assert(s:bind("127.0.0.1", 0))
  local _, port = s:getsockname()
  s:close()
  return tonumber(port)
end

local function port_open(port)
  if not socket_ok then return true end
  local c = socket.tcp()
  c:settimeout(0.2)
  local ok = c:connect("127.0.0.1", port)
  c:close()
  return ok ~= nil
end

-- locations ----------------------------------------------------------------------------

--- The directory holding the simulator's server code (enos_sim/*.lua, the code nginx runs): opts.sim_dir,
-- $ENOS_SIM_DIR, this checkout's sim/, where Lua finds the `enos_sim` modules (a LuaRocks tree installs them as
-- modules beside enos), or share/enos/sim of `make install`.
function M.sim_dir(opts)
  local cands, n = {}, 0
  local function add(d) if d then n = n + 1; cands[n] = d end end
  add(opts and opts.sim_dir)
  add(os.getenv("ENOS_SIM_DIR"))
  local src = debug.getinfo(1, "S").source
  if src:sub(1, 1) == "@" then
    local here = dirname(abspath(src:sub(2)))          -- …/lua/enos/sim
    add(dirname(dirname(dirname(here))) .. "/sim")           -- checkout: <repo>/sim
    add(dirname(dirname(dirname(dirname(here)))) .. "/enos/sim")  -- share/lua/5.x/enos/sim -> share/enos/sim
  end
  local found = package.searchpath and package.searchpath("enos_sim.server", package.path)
  if found then add(dirname(dirname(abspath(found)))) end
  add("/usr/local/share/enos/sim")
  add("/usr/share/enos/sim")
  for i = 1, n do
    local d = cands[i]
    if exists(d .. "/enos_sim/server.lua") then return abspath(d) end
  end
  return nil, "cannot find the simulator's sim/ directory (set ENOS_SIM_DIR)"
end

local function lua51_cdir()
  local ok, out = capture("ls -d /usr/lib/*/lua/5.1 /usr/local/lib/lua/5.1 2>/dev/null")
  if ok or out then
    for d in out:gmatch("[^\n]+") do
      if exists(d .. "/cjson.so") then return d end
    end
  end
  return nil
end

local function nginx_bin()
  for _, p in ipairs { "/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx" } do
    if exists(p) then return p end
  end
  local ok, out = capture("command -v nginx")
  if ok and out:match("%S") then return (out:gsub("%s+$", "")) end
  return nil
end

--- The versions a bug report needs: enos-sim's (the enos it ships with), nginx's, and the Lua that runs it.
-- @treturn string lines "enos-sim V", "nginx: …", "Lua: …"
function M.version_text()
  local ok_core, core = pcall(require, "enos.core")
  local v = ok_core and core._VERSION or "(enos.core not built)"
  local bin = nginx_bin()
  local nginx = "not found (Debian package nginx)"
  if bin then
    local ok, out = capture(q(bin) .. " -v 2>&1")
    nginx = ok and (out:match("nginx version: (%S+)") or out:gsub("%s+$", "")) or "found, no version"
  end
  return string.format("enos-sim %s\nnginx: %s\nLua: %s\n", v, nginx,
    (type(jit) == "table" and jit.version) or _VERSION)
end

--- Check that nginx and every module the simulator needs are installed; ok or nil, message.
function M.check_deps(opts)
  opts = opts or {}
  local missing = {}
  local function need(cond, what, pkg)
    if not cond then missing[#missing + 1] = what .. " (Debian package " .. pkg .. ")" end
  end
  need(nginx_bin(), "nginx", "nginx")
  need(exists(NGINX_MODULES .. "/ngx_http_lua_module.so"), "the nginx Lua module", "libnginx-mod-http-lua")
  need(exists(NGINX_MODULES .. "/ndk_http_module.so"), "the nginx NDK module", "libnginx-mod-http-ndk")
  need(exists("/usr/share/lua/5.1/resty/core.lua"), "resty.core", "lua-resty-core")
  local cdir = lua51_cdir()
  need(cdir, "cjson for LuaJIT", "lua-cjson")
  need(cdir and exists(cdir .. "/_openssl.so") and exists("/usr/share/lua/5.1/openssl.lua"), "luaossl for LuaJIT", "lua-luaossl")
  need(socket_ok, "luasocket", "lua-socket")
  if opts.tls then need(run("command -v openssl >/dev/null 2>&1"), "the openssl command", "openssl") end
  if #missing > 0 then
    return nil, "enos-sim: missing " .. table.concat(missing, ", ") .. ": run `make deps`"
  end
  return true, cdir
end

-- certificates ---------------------------------------------------------------------------

--- Generate a CA and a server certificate for 127.0.0.1/localhost in dir (kept if present).
function M.make_certs(dir)
  local ca, crt, key = dir .. "/ca.pem", dir .. "/server.pem", dir .. "/server.key"
  if exists(ca) and exists(crt) and exists(key) then return { ca = ca, cert = crt, key = key } end
  local ext = dir .. "/server.ext"
  write_file(ext, "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n" ..
    "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
  local ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
  local steps = {
    "openssl req -x509 " .. ec .. " -keyout " .. q(dir .. "/ca.key") .. " -out " .. q(ca) ..
      " -days 3650 -subj '/CN=enos-sim test CA' -addext basicConstraints=critical,CA:TRUE" ..
      " -addext keyUsage=critical,keyCertSign,cRLSign",
    "openssl req " .. ec .. " -keyout " .. q(key) .. " -out " .. q(dir .. "/server.csr") .. " -subj '/CN=localhost'",
    "openssl x509 -req -in " .. q(dir .. "/server.csr") .. " -CA " .. q(ca) .. " -CAkey " .. q(dir .. "/ca.key") ..
      " -set_serial 0x" .. string.format("%x%06x", os.time(), math.random(0, 0xffffff)) ..
      " -days 825 -extfile " .. q(ext) .. " -out " .. q(crt),
  }
  for _, cmd in ipairs(steps) do
    local ok, out = capture(cmd)
    if not ok then return nil, "enos-sim: certificate generation failed: " .. out end
  end
  run("chmod 600 " .. q(dir .. "/ca.key") .. " " .. q(key))
  return { ca = ca, cert = crt, key = key }
end

-- generation -------------------------------------------------------------------------------

--- The default configuration table (sim/enos_sim/default_config.lua).
function M.defaults(opts)
  local dir, err = M.sim_dir(opts)
  if not dir then return nil, err end
  local t, lerr = config.load_file(dir .. "/enos_sim/default_config.lua")
  if not t then return nil, lerr end
  return t
end

local function render(tmpl, vars)
  return (tmpl:gsub("%${([%w_]+)}", function(k)
    local v = vars[k]
    if v == nil then error("enos_sim/nginx_conf.lua: unknown variable " .. k) end
    return tostring(v)
  end))
end

local function whoami()
  local ok, out = capture("id -u")
  if ok and out:match("^0") then
    local _, u = capture("id -un")
    local _, g = capture("id -gn")
    return u:gsub("%s+", ""), g:gsub("%s+", "")
  end
  return nil
end

--- Create the prefix directory and write conf/sim.json + conf/nginx.conf (and certs with tls).
-- Returns an info table (without pid) or nil, err. See M.start for opts.
function M.generate(opts)
  opts = opts or {}
  local ok, cdir = M.check_deps(opts)
  if not ok then return nil, cdir end
  local sim_dir, err = M.sim_dir(opts)
  if not sim_dir then return nil, err end
  local defaults
  defaults, err = M.defaults(opts)
  if not defaults then return nil, err end
  local build_opts = {}
  for k, v in pairs(opts) do build_opts[k] = v end
  if opts.state_file then build_opts.state_file = abspath(opts.state_file) end
  if opts.config_file then build_opts.config_file = abspath(opts.config_file) end
  local cfg
  cfg, err = config.build(defaults, build_opts)
  if not cfg then return nil, "enos-sim: " .. err end

  local prefix = opts.prefix
  if not prefix then
    local tmp = os.getenv("TMPDIR") or "/tmp"
    local mk_ok, out = capture("mktemp -d " .. q(tmp .. "/enos-sim.XXXXXX"))
    if not mk_ok then return nil, "enos-sim: mktemp failed: " .. out end
    prefix = out:gsub("%s+$", "")
  end
  prefix = abspath(prefix):gsub("/+$", "")
  run("mkdir -p " .. q(prefix .. "/conf") .. " " .. q(prefix .. "/logs") .. " " .. q(prefix .. "/tmp"))
  run("chmod 700 " .. q(prefix))
  if not exists(prefix .. "/conf/.") and not run("test -d " .. q(prefix .. "/conf")) then
    return nil, "enos-sim: cannot create prefix " .. prefix
  end
  -- the mark of a prefix this launcher made: `stop --clean` removes only a directory that has it
  local mark = io.open(prefix .. "/" .. M.MARK, "w")
  if mark then mark:write("enos-sim prefix\n") mark:close() end

  -- the CA signs the server certificates and the devices' (the certificate API, the mutual-TLS login): made
  -- at every start (three small EC operations), whether the API listener has TLS or not
  local ca_certs
  ca_certs, err = M.make_certs(prefix .. "/conf")
  if not ca_certs then return nil, err end
  local certs = opts.tls and ca_certs or nil
  cfg.device_ca_cert, cfg.device_ca_key = ca_certs.ca, prefix .. "/conf/ca.key"
  cfg.prefix = prefix
  local cfg_file = prefix .. "/conf/sim.json"
  local wok, werr = write_file(cfg_file, cjson.encode(cfg), "600")
  if not wok then return nil, "enos-sim: cannot write " .. cfg_file .. ": " .. tostring(werr) end

  local port = opts.port or M.free_port()
  local mtls_port = opts.mtls_port or M.free_port()
  if mtls_port == port then mtls_port = M.free_port() end
  local tf = sim_dir .. "/enos_sim/nginx_conf.lua"
  local tok, tmpl = pcall(dofile, tf)
  if not tok or type(tmpl) ~= "string" then return nil, "enos-sim: cannot read " .. tf .. ": " .. tostring(tmpl) end
  local u, g = whoami()
  local ssl_lines = ""
  if certs then
    ssl_lines = "        ssl_certificate " .. certs.cert .. ";\n        ssl_certificate_key " .. certs.key .. ";\n" ..
      "        ssl_protocols TLSv1.2 TLSv1.3;\n        ssl_session_cache shared:enos_ssl:1m;\n"
  end
  local access_log = "off"
  if opts.access_log ~= false then access_log = prefix .. "/logs/access.log combined buffer=64k flush=1s" end
  local text = render(tmpl, {
    USER_LINE = u and ("user " .. u .. " " .. g .. ";") or "# (not root: nginx keeps the current user)",
    WORKERS = tonumber(opts.workers) or 1,
    DAEMON = opts.daemon == false and "off" or "on",
    PREFIX = prefix,
    LOG_LEVEL = opts.log_level or "warn",
    ACCESS_LOG = access_log,
    SIM_DIR = sim_dir,
    LUA_DIR = dirname(sim_dir) .. "/lua",
    LUA_CDIR = cdir,
    CONFIG_FILE = cfg_file,
    PORT = port,
    LISTEN_SSL = certs and " ssl" or "",
    -- device state; about 1 KiB a device: raise it (config state_dict_mb) for large fleets
    STATE_DICT = string.format("%dm", math.floor(tonumber(cfg.state_dict_mb) or 64)),
    SSL_LINES = ssl_lines,
    MTLS_PORT = mtls_port,
    SERVER_CERT = ca_certs.cert, SERVER_KEY = ca_certs.key, DEVICE_CA = ca_certs.ca,
  })
  write_file(prefix .. "/conf/nginx.conf", text)
  local scheme = certs and "https" or "http"
  local url = scheme .. "://127.0.0.1:" .. port
  return {
    url = url, admin_url = url .. "/__sim", ca_file = certs and certs.ca or nil,
    mtls_url = "https://127.0.0.1:" .. mtls_port, mtls_port = mtls_port, mtls_ca = ca_certs.ca, device_ca = ca_certs.ca,
    prefix = prefix, port = port, tls = certs ~= nil, config = cfg,
    config_file = cfg_file, nginx_conf = prefix .. "/conf/nginx.conf",
    pid_file = prefix .. "/logs/nginx.pid", error_log = prefix .. "/logs/error.log",
    state_file = cfg.state_file,
  }
end

local function nginx_cmd(info)
  return q(nginx_bin()) .. " -p " .. q(info.prefix .. "/") .. " -c " .. q(info.nginx_conf) ..
    " -e " .. q(info.error_log)
end

local function read_pid(prefix)
  local s = read_file(prefix .. "/logs/nginx.pid")
  return s and tonumber(s:match("%d+"))
end
--- The pid in a prefix's logs/nginx.pid, or nil.
-- @function read_pid
-- @tparam string prefix
M.read_pid = read_pid

local function tail(path, n)
  local s = read_file(path) or ""
  local lines = {}
  for l in s:gmatch("[^\n]+") do lines[#lines + 1] = l end
  return table.concat(lines, "\n", math.max(1, #lines - (n or 10) + 1))
end

--- Start the simulator as a daemon. opts: prefix, port, tls, workers, config (table merged over the
-- defaults), config_file, state_file, access_key, secret_key, public_key_file, org, seed_product,
-- secret_scheme, token_ttl, access_log (false = off), log_level, sim_dir, timeout (s, default 10).
-- Returns info {url, admin_url, ca_file, prefix, port, pid, tls, config, …} or nil, err.
function M.start(opts)
  opts = opts or {}
  if opts.prefix then
    local pid = read_pid(abspath(opts.prefix))
    if pid and M.alive(pid) then return nil, "enos-sim: already running in " .. opts.prefix .. " (pid " .. pid .. ")" end
  end
  local attempts = opts.port and 1 or 5
  local info, err
  for _ = 1, attempts do
    local o = {}
    for k, v in pairs(opts) do o[k] = v end
    o.daemon = true
    info, err = M.generate(o)
    if not info then return nil, err end
    opts.prefix = info.prefix  -- reuse the same prefix on a retry
    os.remove(info.pid_file)
    local ok, out = capture(nginx_cmd(info))
    if ok then
      err = nil
      break
    end
    err = "enos-sim: nginx failed to start: " .. out:gsub("%s+$", "") .. "\n" .. tail(info.error_log, 5)
    if not (out .. tail(info.error_log, 5)):find("Address already in use", 1, true) then break end
  end
  if err then return nil, err end
  local deadline = now() + (opts.timeout or 10)
  local pid
  repeat
    pid = read_pid(info.prefix)
    if pid and port_open(info.port) then break end
    sleep(0.02)
  until now() > deadline
  if not (pid and M.alive(pid)) then
    return nil, "enos-sim: nginx did not come up:\n" .. tail(info.error_log, 10)
  end
  info.pid = pid
  local public = {}
  for k, v in pairs(info) do if k ~= "config" then public[k] = v end end
  write_file(info.prefix .. "/sim-info.json", cjson.encode(public))
  return info
end

--- Run in the foreground (daemon off) until nginx exits (Ctrl-C stops it). `on_ready(info)` is
-- called before nginx starts serving. Returns true or nil, err.
function M.run(opts, on_ready)
  opts = opts or {}
  local o = {}
  for k, v in pairs(opts) do o[k] = v end
  o.daemon = false
  local info, err = M.generate(o)
  if not info then return nil, err end
  if on_ready then on_ready(info) end
  local ok = run("exec " .. nginx_cmd(info))
  if not ok then return nil, "enos-sim: nginx exited with an error:\n" .. tail(info.error_log, 10) end
  return true
end

local function children(pid)
  local ok, out = capture("pgrep -P " .. tonumber(pid))
  local list = {}
  if ok then for p in out:gmatch("%d+") do list[#list + 1] = tonumber(p) end end
  return list
end

local function wait_gone(pids, secs)
  local deadline = now() + secs
  repeat
    local any = false
    for _, p in ipairs(pids) do if M.alive(p) then any = true end end
    if not any then return true end
    sleep(0.02)
  until now() > deadline
  return false
end

--- Stop the simulator of a prefix: QUIT (graceful), then TERM, then KILL; waits for every
-- nginx process of it to exit. Safe when nothing runs. opts: timeout (s, for the graceful stop),
-- clean (also remove the prefix directory). Returns true, "stopped"|"not running".
function M.stop(prefix, opts)
  opts = opts or {}
  if not prefix then return nil, "enos-sim: stop needs --prefix" end
  prefix = abspath(prefix)
  local pid = read_pid(prefix)
  if pid and M.alive(pid) and not M.is_master_of(pid, prefix) then
    -- a pid file (or a planted one) naming a process that is not this prefix's nginx: never signalled
    return nil, ("enos-sim: process %d is not the nginx master of %s; not signalling it"):format(pid, prefix)
  end
  if not pid or not M.alive(pid) then
    os.remove(prefix .. "/logs/nginx.pid")
    if opts.clean then M.remove_prefix(prefix) end
    return true, "not running"
  end
  local all = children(pid)
  table.insert(all, 1, pid)
  for _, sig in ipairs { "QUIT", "TERM", "KILL" } do
    for i, p in ipairs(all) do
      if i == 1 or sig == "KILL" then run("kill -" .. sig .. " " .. p .. " 2>/dev/null") end
    end
    local wait = sig == "QUIT" and (opts.timeout or 5) or 3
    if wait_gone(all, wait) then
      os.remove(prefix .. "/logs/nginx.pid")
      if opts.clean then M.remove_prefix(prefix) end
      return true, "stopped"
    end
  end
  return nil, "enos-sim: nginx (pid " .. pid .. ") did not exit"
end

--- Status of a prefix: {running=bool, pid, url, admin_url, ca_file, prefix, …}.
function M.status(prefix)
  prefix = abspath(prefix)
  local s = read_file(prefix .. "/sim-info.json")
  local info = s and cjson.decode(s) or { prefix = prefix }
  local pid = read_pid(prefix)
  info.pid = pid
  info.running = pid ~= nil and M.alive(pid)
  return info
end

--- True when process `pid` is the nginx master running with prefix `prefix` (its command line, as nginx
-- rewrites it: "nginx: master process nginx -p PREFIX …").
function M.is_master_of(pid, prefix)
  local cmd = read_file("/proc/" .. tonumber(pid) .. "/cmdline")
  if not cmd then return false end
  cmd = cmd:gsub("%z", " ")
  if not cmd:find("nginx: master process", 1, true) then return false end
  cmd = cmd .. " "
  return cmd:find("-p " .. prefix .. " ", 1, true) ~= nil or cmd:find("-p " .. prefix .. "/ ", 1, true) ~= nil
end

--- The file (relative to a prefix) that marks a prefix this launcher made: `remove_prefix` removes only a directory with it.
M.MARK = "conf/enos-sim.prefix"

--- Remove a prefix directory: only one this launcher made (its mark), owned by the user, not a symlink.
function M.remove_prefix(prefix)
  if not prefix or not exists(prefix .. "/" .. M.MARK) or not exists(prefix .. "/conf/nginx.conf") then return false end
  if run("test -L " .. q(prefix)) then return false end
  local _, owner = capture("stat -c %u " .. q(prefix))
  local _, me = capture("id -u")
  if not owner or owner:gsub("%s", "") ~= (me or ""):gsub("%s", "") then return false end
  run("rm -rf " .. q(prefix))
  return true
end

return M
