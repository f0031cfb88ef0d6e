-- Shared test helpers: temp files, RSA keys made at test time, an independent
-- encryptor (openssl command + luaossl, never enos.core), stub transports, and a
-- tiny nginx for transport tests.
local H = {}

function H.sh(cmd)
  local p = assert(io.popen(cmd .. " 2>&1"))
  local out = p:read("*a")
  local ok, _, code = p:close()
  if ok == true or code == 0 then return out end
  error("command failed: " .. cmd .. "\n" .. out)
end

function H.tmpdir()
  return (H.sh("mktemp -d /tmp/enos-spec.XXXXXX"):gsub("%s+$", ""))
end

function H.readfile(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

function H.writefile(path, s, mode)
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
  if mode then H.sh("chmod " .. mode .. " " .. path) end
end

-- An RSA key pair: {dir, private_file, public_file, private_pem}. Cached per run.
local keys = {}
function H.keypair(bits)
  bits = bits or 2048
  if keys[bits] then return keys[bits] end
  local dir = H.tmpdir()
  local priv, pub = dir .. "/app_private.pem", dir .. "/app_public.pem"
  H.sh(("openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:%d -out %s"):format(bits, priv))
  H.sh(("openssl pkey -in %s -pubout -out %s && chmod 600 %s"):format(priv, pub, priv))
  keys[bits] = { dir = dir, private_file = priv, public_file = pub, private_pem = H.readfile(priv) }
  return keys[bits]
end

local function hex(s) return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end)) end
H.hex = hex

local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
-- Plain-Lua base64 (independent of enos.core).
local function b64(s, url)
  local out = {}
  for i = 1, #s, 3 do
    local a, b, c = s:byte(i, i + 2)
    local n = a * 65536 + (b or 0) * 256 + (c or 0)
    local chars = {}
    for j = 3, 0, -1 do
      local idx = math.floor(n / 64 ^ j) % 64
      chars[#chars + 1] = B64:sub(idx + 1, idx + 1)
    end
    if not b then chars[3], chars[4] = "=", "=" elseif not c then chars[4] = "=" end
    out[#out + 1] = table.concat(chars)
  end
  local r = table.concat(out)
  if url then r = r:gsub("%+", "-"):gsub("/", "_"):gsub("=", "") end
  return r
end
H.b64 = b64

local function encode(s, enc)
  if enc == "hex" then return hex(s) end
  return b64(s, enc == "base64url")
end

-- Encrypts plaintext for public key file `pub` under scheme
-- {rsa_padding, aes_mode, key_format, encoding, key_bits} with the openssl
-- command (RSA) and luaossl (AES): the independent path the tests trust.
function H.encrypt_secret(pub, plaintext, scheme)
  local cipher = require "openssl.cipher"
  local rand = require "openssl.rand"
  scheme = scheme or {}
  local pad = scheme.rsa_padding or "pkcs1"
  local mode = scheme.aes_mode or "ecb"
  local kf = scheme.key_format or "raw"
  local enc = scheme.encoding or "base64"
  local bits = scheme.key_bits or 128
  local k = rand.bytes(bits / 8)
  local kmat = kf == "raw" and k or kf == "hex" and hex(k) or b64(k)
  local dir = H.tmpdir()
  H.writefile(dir .. "/k", kmat)
  local opts = ({
    pkcs1 = "-pkeyopt rsa_padding_mode:pkcs1",
    oaep = "-pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha1 -pkeyopt rsa_mgf1_md:sha1",
    ["oaep-sha256"] = "-pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha256 -pkeyopt rsa_mgf1_md:sha256",
  })[pad]
  H.sh(("openssl pkeyutl -encrypt -pubin -inkey %s %s -in %s/k -out %s/k.enc"):format(pub, opts, dir, dir))
  local wrapped = H.readfile(dir .. "/k.enc")
  local name = ("aes-%d-%s"):format(bits, mode)
  local c = cipher.new(name)
  local ct
  if mode == "ecb" then
    c:encrypt(k, nil, true)
    ct = c:final(plaintext)
  elseif mode == "cbc" then
    local iv = rand.bytes(16)
    c:encrypt(k, iv, true)
    ct = iv .. c:final(plaintext)
  else
    local iv = rand.bytes(12)
    c:encrypt(k, iv)
    local body = c:final(plaintext)
    ct = iv .. body .. c:getTag(16)
  end
  H.sh("rm -rf " .. dir)
  return encode(wrapped, enc), encode(ct, enc)
end

-- A fake clock (ms) the tests advance by hand.
function H.clock(start)
  local t = { now = start or 1700000000000 }
  t.fn = function() return t.now end
  function t.advance(ms) t.now = t.now + ms end
  return t
end

-- A stub transport: `handler(req) -> {status, headers, body} | nil, err`.
-- Records every request in t.requests. The default handler plays a token
-- service that issues "tok-N".
function H.stub(handler, opts)
  opts = opts or {}
  local cjson = require "cjson"
  local t = { requests = {}, tokens = 0, token_requests = 0 }
  function t:send(req)
    self.requests[#self.requests + 1] = req
    if req.url:find("/apim-token-service/", 1, true) then
      self.token_requests = self.token_requests + 1
      if opts.token_handler then return opts.token_handler(req, self) end
      self.tokens = self.tokens + 1
      return { status = 200, headers = {}, body = cjson.encode {
        status = 0, msg = "SUCCESS", business = "apim-token-service",
        data = { accessToken = "tok-" .. self.tokens, expire = opts.expire or 7200 } } }
    end
    return handler(req, self)
  end
  function t:api_requests()
    local out = {}
    for _, r in ipairs(self.requests) do
      if not r.url:find("/apim-token-service/", 1, true) then out[#out + 1] = r end
    end
    return out
  end
  return t
end

function H.envelope(data, code, msg, extra)
  local cjson = require "cjson"
  local doc = { code = code or 0, msg = msg or "OK", requestId = "req-1234", data = data == nil and cjson.null or data }
  for k, v in pairs(extra or {}) do doc[k] = v end
  return { status = 200, headers = {}, body = cjson.encode(doc) }
end

function H.free_port()
  local socket = require "socket"
  local s = assert(socket.bind("127.0.0.1", 0))
  local _, port = s:getsockname()
  s:close()
  return tonumber(port)
end

-- Stops the process in a pid file: TERM, wait up to 3 s, then KILL.
function H.stop_pidfile(pidfile)
  os.execute(([[pid=$(cat %s 2>/dev/null) || exit 0
kill -TERM "$pid" 2>/dev/null || exit 0
for i in $(seq 30); do kill -0 "$pid" 2>/dev/null || exit 0; sleep 0.1; done
kill -KILL "$pid" 2>/dev/null; pkill -KILL -P "$pid" 2>/dev/null; exit 0]]):format(pidfile))
end

-- Starts a small nginx serving `locations` (nginx config text) on a free port,
-- over TLS with a self-signed certificate when tls = true.
-- Returns {url, prefix, stop = function}.
function H.nginx(locations, tls)
  local prefix = H.tmpdir()
  local port = H.free_port()
  local listen = ("listen 127.0.0.1:%d;"):format(port)
  local extra = ""
  if tls then
    H.sh(("openssl req -x509 -newkey rsa:2048 -nodes -keyout %s/key.pem -out %s/cert.pem -days 2 "
      .. "-subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1"):format(prefix, prefix))
    listen = ("listen 127.0.0.1:%d ssl;"):format(port)
    extra = ("ssl_certificate %s/cert.pem; ssl_certificate_key %s/key.pem;"):format(prefix, prefix)
  end
  local srv = { url = ("%s://127.0.0.1:%d"):format(tls and "https" or "http", port), prefix = prefix,
    cert = tls and prefix .. "/cert.pem" or nil }
  H.run_nginx(prefix, ([[
  lua_package_path "/usr/share/lua/5.1/?.lua;;";
  keepalive_requests 1000;
  server {
    %s
    %s
    %s
  }
]]):format(listen, extra, locations), srv.url .. "/", "warn")
  function srv.stop()
    if srv.stopped then return end
    srv.stopped = true
    H.stop_pidfile(prefix .. "/nginx.pid")
    os.execute("rm -rf " .. prefix)
  end
  return srv
end

--- nginx's `user` line for the specs' servers: workers run as the invoking user, like enos-sim's. Run as
-- root, nginx would otherwise drop them to nobody, who cannot read a checkout (or a prefix) in a private
-- directory: /root, mktemp -d, a 0700 home. Not root, nginx keeps the current user: no line.
function H.nginx_user_line()
  if H.sh("id -u"):match("^0%s*$") then
    return ("user %s %s;\n"):format((H.sh("id -un"):gsub("%s+", "")), (H.sh("id -gn"):gsub("%s+", "")))
  end
  return ""
end

-- Writes <prefix>/nginx.conf (one worker with the Lua module, daemon, access log off) with
-- `http_body` inside http {}, starts nginx and waits until probe_url answers. Stop it with
-- H.stop_pidfile(prefix .. "/nginx.pid").
function H.run_nginx(prefix, http_body, probe_url, log_level)
  H.sh("mkdir -p " .. prefix .. "/logs")
  H.writefile(prefix .. "/nginx.conf", H.nginx_user_line() .. ([[
load_module /usr/lib/nginx/modules/ndk_http_module.so;
load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;
worker_processes 1;
daemon on;
pid %s/nginx.pid;
error_log %s/logs/error.log %s;
events { worker_connections 256; }
http {
  access_log off;
%s
}
]]):format(prefix, prefix, log_level or "warn", http_body))
  H.sh(("nginx -p %s -c %s/nginx.conf -e %s/logs/error.log"):format(prefix, prefix, prefix))
  for _ = 1, 50 do
    local ok = os.execute(("curl -sk -o /dev/null %s 2>/dev/null"):format(probe_url))
    if ok == true or ok == 0 then break end
    os.execute("sleep 0.05")
  end
end

return H
