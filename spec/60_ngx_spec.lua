-- enos inside nginx: the cosocket transport, the shared-dict token cache and the example endpoint
-- (examples/nginx) against the simulator, driven over HTTP with the curl command.
local N = dofile("spec/60_ngx_helper.lua")
local H = N.H
local sim = dofile("spec/sim_helper.lua")
local cjson = require "cjson"
local tngx = require "enos.transport.ngx"

local function decode(s)
  local ok, v = pcall(cjson.decode, s or "")
  return ok and v or nil
end

describe("enos.transport.ngx outside nginx", function()
  it("loads, knows it is not in nginx, and lets the client fall back to libcurl", function()
    assert.is_false(tngx.in_nginx())
    assert.is_false(tngx.auto())
    local ok, err = tngx.check_phase()
    assert.is_nil(ok)
    assert.equal("config", err.kind)
    local _, serr = tngx.new():send { url = "http://127.0.0.1:1/" }
    assert.equal("config", serr.kind)
  end)

  it("parses URLs and rejects bad ones as config errors", function()
    local u = assert(tngx.parse_url("https://gw.example.com/a/b?x=1&y=2#frag"))
    assert.same({ "https", "gw.example.com", 443, "/a/b?x=1&y=2", true }, { u.scheme, u.host, u.port, u.target, u.tls })
    u = assert(tngx.parse_url("http://127.0.0.1:8080?q=1"))
    assert.same({ 8080, "/?q=1", "127.0.0.1:8080" }, { u.port, u.target, u.authority })
    u = assert(tngx.parse_url("https://[::1]:8443/x"))
    assert.same({ "::1", 8443 }, { u.host, u.port })
    for _, bad in ipairs { "ftp://h/x", "http://", "nonsense", "http://u@h/", "http://h:99999/", "http://h/a b", 42 } do
      local r, err = tngx.parse_url(bad)
      assert.is_nil(r, tostring(bad))
      assert.equal("config", err.kind)
    end
  end)
end)

-- A test nginx: backend locations, two TLS servers (trusted / untrusted certificate) and /run, which
-- runs the Lua chunk in the request body inside nginx and answers its result as JSON.
describe("enos.transport.ngx inside nginx", function()
  local srv, tls_port, bad_port, dir

  local function run(code, timeout)
    local st, body = N.http { method = "POST", url = srv.url .. "/run", body = code, timeout = timeout or 20 }
    assert.equal(200, st, body)
    local r = decode(body)
    assert(r, "not JSON: " .. tostring(body))
    assert(not r.lua_error, r.lua_error)
    return r
  end

  setup(function()
    dir = H.tmpdir()
    H.sh(("chmod 755 %s && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout %s/good.key " ..
      "-out %s/good.pem -days 2 -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1"):format(dir, dir, dir))
    H.sh(("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout %s/bad.key " ..
      "-out %s/bad.pem -days 2 -subj /CN=localhost -addext subjectAltName=DNS:localhost"):format(dir, dir))
    H.sh("chmod 644 " .. dir .. "/*")
    tls_port, bad_port = H.free_port(), H.free_port()
    local http_extra = ([[
  lua_ssl_trusted_certificate %s/good.pem;
  lua_shared_dict results 1m;
  lua_shared_dict tokens 1m;
  init_by_lua_block {
    local ok, e = require("enos.ngx").check_phase()
    local t, te = require("enos.transport.ngx").auto()
    INIT_RESULT = { ok = ok or false, message = e and e.message, phase = e and e.phase, auto = t and "transport" or te and te.kind }
  }
  server {
    listen 127.0.0.1:%d ssl;
    ssl_certificate %s/good.pem; ssl_certificate_key %s/good.key;
    location = /ok { default_type application/json; return 200 '{"code":0}'; }
  }
  server {
    listen 127.0.0.1:%d ssl;
    ssl_certificate %s/bad.pem; ssl_certificate_key %s/bad.key;
    location = /ok { default_type application/json; return 200 '{"code":0}'; }
  }
]]):format(dir, tls_port, dir, dir, bad_port, dir, dir)
    local server_body = [[
    location = /ok { default_type application/json; return 200 '{"code":0,"msg":"OK"}'; }
    location = /echo {
      content_by_lua_block {
        ngx.req.read_body()
        local h = ngx.req.get_headers()
        ngx.header["X-Method"] = ngx.req.get_method()
        ngx.header["X-Got"] = h["x-test"] or ""
        ngx.header["X-Len"] = h["content-length"] or "none"
        ngx.header["Set-Cookie"] = { "a=1", "b=2" }
        ngx.print(ngx.req.get_body_data() or "")
      }
    }
    location = /chunked {
      content_by_lua_block {
        for i = 1, 5 do ngx.print(string.rep(tostring(i), 1000 * i)) ngx.flush(true) end
      }
    }
    location = /untilclose {
      chunked_transfer_encoding off;
      content_by_lua_block { ngx.print("abc") ngx.flush(true) ngx.print("def") }
    }
    location = /slow { content_by_lua_block { ngx.sleep(2) ngx.say("late") } }
    location = /big { content_by_lua_block { local s = string.rep("x", 65536) for _ = 1, 40 do ngx.print(s) end } }
    location = /bigcl {
      content_by_lua_block {
        ngx.header["Content-Length"] = 40 * 65536
        local s = string.rep("x", 65536) for _ = 1, 40 do ngx.print(s) end
      }
    }
    location = /drop { return 444; }
    location = /applied_then_drop {
      content_by_lua_block { ngx.shared.results:incr("applied", 1, 0) ngx.exit(444) }
    }
    location = /empty { return 204; }
    location = /logphase {
      content_by_lua_block { ngx.say("hi") }
      header_filter_by_lua_block {
        local _, err = require("enos.transport.ngx").new():send { url = "http://127.0.0.1:" .. ngx.var.server_port .. "/ok" }
        ngx.shared.results:set("header_filter", err and (err.kind .. "|" .. err.message) or "sent")
      }
      log_by_lua_block {
        local _, err = require("enos.transport.ngx").new():send { url = "http://127.0.0.1:" .. ngx.var.server_port .. "/ok" }
        ngx.shared.results:set("log", err and (err.kind .. "|" .. err.message) or "sent")
        local a, ae = require("enos.transport.ngx").auto()
        ngx.shared.results:set("log_auto", a and "transport" or ae.kind)
      }
    }
    location = /run {
      content_by_lua_block {
        local cjson = require "cjson"
        ngx.req.read_body()
        local f = assert(loadstring(ngx.req.get_body_data()))
        local ok, r = pcall(f)
        ngx.say(cjson.encode(ok and r or { lua_error = tostring(r) }))
      }
    }
]]
    srv = N.start_plain(server_body, http_extra)
  end)

  teardown(function()
    if srv then srv.stop() end
    if dir then os.execute("rm -rf " .. dir) end
  end)

  local function base() return srv.url end

  it("sends a POST with headers and body; reply header names are lower case", function()
    local r = run(([[
      local t = require("enos.transport.ngx").new { timeout = 5 }
      local res = assert(t:send { method = "POST", url = "%s/echo", body = '{"a":1}',
        headers = { ["X-Test"] = "hello", ["Content-Type"] = "application/json" } })
      return res
    ]]):format(base()))
    assert.equal(200, r.status)
    assert.equal('{"a":1}', r.body)
    assert.equal("POST", r.headers["x-method"])
    assert.equal("hello", r.headers["x-got"])
    assert.equal("7", r.headers["x-len"])
    assert.equal("a=1, b=2", r.headers["set-cookie"])
    for k in pairs(r.headers) do assert.equal(k:lower(), k) end
  end)

  it("keeps connections alive in the pool, for once requests too; a once request is never re-sent", function()
    local r = run(([[
      local t = require("enos.transport.ngx").new { timeout = 5 }
      local d = ngx.shared.results
      local out = {}
      for i = 1, 3 do out[i] = assert(t:send { url = "%s/ok" }).new_connections end
      out[4] = assert(t:send { method = "POST", url = "%s/echo", body = "x", once = true }).new_connections
      out[5] = assert(t:send { url = "%s/ok" }).new_connections
      -- taken, then the connection closed without a reply: a once request is not sent again
      local before = d:get("applied") or 0
      local _, e = t:send { method = "POST", url = "%s/applied_then_drop", body = "x", once = true }
      local once = (d:get("applied") or 0) - before
      assert(t:send { url = "%s/ok" })
      t:send { method = "POST", url = "%s/applied_then_drop", body = "x" }
      local plain = (d:get("applied") or 0) - before - once
      return { out = out, once = once, plain = plain, kind = e and e.kind, sent = e and e.request_sent }
    ]]):format(base(), base(), base(), base(), base(), base()))
    -- the first may reuse a connection an earlier test left in the pool
    assert.same({ 0, 0, 0, 0 }, { r.out[2], r.out[3], r.out[4], r.out[5] })
    assert.equal(1, r.once)
    assert.same({ "transport", true }, { r.kind, r.sent })
    assert.equal(2, r.plain)         -- an idempotent request is retried once on a fresh connection
  end)

  it("reads chunked replies, replies delimited by close, and empty ones", function()
    local r = run(([[
      local t = require("enos.transport.ngx").new { timeout = 5 }
      local a = assert(t:send { url = "%s/chunked" })
      local b = assert(t:send { url = "%s/untilclose" })
      local c = assert(t:send { url = "%s/empty" })
      return { a = a.body, te = a.headers["transfer-encoding"], b = b.body, c = c.body, cs = c.status }
    ]]):format(base(), base(), base()))
    local want = {}
    for i = 1, 5 do want[i] = string.rep(tostring(i), 1000 * i) end
    assert.equal(table.concat(want), r.a)
    assert.equal("chunked", r.te)
    assert.equal("abcdef", r.b)
    assert.same({ "", 204 }, { r.c, r.cs })
  end)

  it("gives up at the deadline with kind timeout and request_sent", function()
    local r = run(([[
      local t = require("enos.transport.ngx").new { timeout = 30 }
      local t0 = ngx.now()
      local res, err = t:send { url = "%s/slow", timeout = 0.3 }
      ngx.update_time()
      return { res = res, err = err, ms = (ngx.now() - t0) * 1000 }
    ]]):format(base()))
    assert.is_nil(r.res)
    assert.equal("timeout", r.err.kind)
    assert.is_true(r.err.request_sent)
    assert.is_true(r.ms < 1500, "took " .. r.ms .. " ms")
  end)

  it("caps the reply body (chunked and Content-Length) with kind protocol", function()
    local r = run(([[
      local t = require("enos.transport.ngx").new { timeout = 5, max_body = 1024 * 1024 }
      local _, e1 = t:send { url = "%s/big" }
      local _, e2 = t:send { url = "%s/bigcl" }
      local ok = assert(require("enos.transport.ngx").new { timeout = 5 }:send { url = "%s/big" })
      return { e1 = e1, e2 = e2, len = #ok.body }
    ]]):format(base(), base(), base()))
    assert.equal("protocol", r.e1.kind)
    assert.equal("protocol", r.e2.kind)
    assert.matches("larger than", r.e2.message)
    assert.equal(40 * 65536, r.len)          -- under the default 8 MiB
  end)

  it("names connection failures: refused (not sent), dropped (sent), bad URL (config)", function()
    local dead = H.free_port()
    local r = run(([[
      local t = require("enos.transport.ngx").new { timeout = 5 }
      local _, refused = t:send { url = "http://127.0.0.1:%d/x" }
      local _, dropped = t:send { method = "POST", url = "%s/drop", body = "x", once = true }
      local _, bad = t:send { url = "gopher://x/" }
      local _, hdr = t:send { url = "%s/ok", headers = { ["X-Evil"] = "a\r\nInjected: 1" } }
      return { refused = refused, dropped = dropped, bad = bad, hdr = hdr }
    ]]):format(dead, base(), base()))
    assert.equal("transport", r.refused.kind)
    assert.is_false(r.refused.request_sent)
    assert.equal("transport", r.dropped.kind)
    assert.is_true(r.dropped.request_sent)
    assert.equal("config", r.bad.kind)
    assert.equal("config", r.hdr.kind)
  end)

  it("verifies TLS certificates against lua_ssl_trusted_certificate and the host name", function()
    local r = run(([[
      local T = require("enos.transport.ngx")
      local t = T.new { timeout = 5 }
      local a = assert(t:send { url = "https://localhost:%d/ok" })
      local b = assert(t:send { url = "https://localhost:%d/ok" })
      local _, untrusted = t:send { url = "https://localhost:%d/ok" }
      local _, by_ip = t:send { url = "https://127.0.0.1:%d/ok" }
      local insecure = T.new { timeout = 5, verify_tls = false }:send { url = "https://localhost:%d/ok" }
      return { a = a.status, body = a.body, reused = b.new_connections, untrusted = untrusted, by_ip = by_ip,
        insecure = insecure and insecure.status }
    ]]):format(tls_port, tls_port, bad_port, tls_port, bad_port))
    assert.equal(200, r.a)
    assert.equal('{"code":0}', r.body)
    assert.equal(0, r.reused)
    assert.equal("tls", r.untrusted.kind)
    assert.is_false(r.untrusted.request_sent)
    assert.equal("tls", r.by_ip.kind)
    assert.matches("DNS name", r.by_ip.message)
    assert.equal(200, r.insecure)
  end)

  it("refuses, with a clear error, in phases without cosockets; works in timers", function()
    local st = N.http { url = srv.url .. "/logphase" }
    assert.equal(200, st)
    os.execute("sleep 0.2")
    local r = run([[
      local d = ngx.shared.results
      local done = false
      local url = "http://127.0.0.1:" .. ngx.var.server_port .. "/ok"
      ngx.timer.at(0, function()
        local res, err = require("enos.transport.ngx").new():send { url = url }
        d:set("timer", res and res.status or err.message)
        done = true
      end)
      for _ = 1, 200 do if done then break end ngx.sleep(0.01) end
      return { log = d:get("log"), log_auto = d:get("log_auto"), header_filter = d:get("header_filter"),
        timer = d:get("timer"), init = INIT_RESULT }
    ]])
    assert.matches("^config|enos: EnOS calls cannot run in nginx's 'log' phase", r.log)
    assert.matches("content_by_lua", r.log)
    assert.matches("'header_filter' phase", r.header_filter)
    assert.equal("config", r.log_auto)
    assert.equal(200, r.timer)
    assert.is_false(r.init.ok)
    assert.equal("init", r.init.phase)
    assert.matches("'init' phase", r.init.message)
    assert.equal("config", r.init.auto)
  end)

  it("enos.client picks the cosocket transport by itself inside nginx", function()
    local r = run([[
      local c = assert(require("enos").client { endpoint = "http://127.0.0.1:1", access_key = "a", secret_key = "b",
        org_id = "o" })
      local t, err = c:transport()
      return { name = t and (getmetatable(t) or {}).__name, err = err and tostring(err) }
    ]])
    assert.equal("enos.transport.ngx", r.name, tostring(r.err))
  end)

  it("waits for a condition without blocking (wait_for)", function()
    local r = run([[
      local t = require("enos.transport.ngx").new()
      local flag = false
      ngx.timer.at(0.05, function() flag = true end)
      local ok = t:wait_for(function() return flag end, 2)
      local timed_out = t:wait_for(function() return false end, 0.05)
      return { ok = ok, timed_out = timed_out }
    ]])
    assert.is_true(r.ok)
    assert.is_false(r.timed_out)
  end)

  it("token cache: one caller fetches, the others wait for its token; abort lets the next one try", function()
    local r = run([[
      local cache = require("enos.ngx").token_cache("tokens")
      local now = ngx.now() * 1000
      local client = { endpoint = "https://gw", access_key = "ak", timeout = 2, connect_timeout = 1,
        clock = function() return ngx.now() * 1000 end }
      local other = setmetatable({}, { __index = client })    -- another client (think: another worker)
      local first = cache:get(client)                          -- nil: holds the lock, goes to fetch
      local th = ngx.thread.spawn(function() return cache:get(other) end)
      ngx.sleep(0.05)
      cache:set(client, { value = "tok-1", expires_at = now + 7200 * 1000, ttl = 7200 })
      local _, waited = ngx.thread.wait(th)
      local hit = cache:get(other)
      -- a token due for refresh: one caller gets it back with the lock, the next waits; abort releases
      cache:set(client, { value = "tok-old", expires_at = now + 60 * 1000, ttl = 7200 })
      local stale = cache:get(client)
      local th2 = ngx.thread.spawn(function() return cache:get(other) end)
      ngx.sleep(0.05)
      cache:abort(client)
      local _, after_abort = ngx.thread.wait(th2)
      cache:set(other, nil)
      return { first = first or "nil", waited = waited and waited.value, hit = hit and hit.value,
        stale = stale and stale.value, after_abort = after_abort and after_abort.value,
        gone = cache:get(client) == nil, stats = cache.stats }
    ]])
    assert.equal("nil", r.first)
    assert.equal("tok-1", r.waited)
    assert.equal("tok-1", r.hit)
    assert.equal("tok-old", r.stale)
    assert.equal("tok-old", r.after_abort)   -- the waiter gets what is there and may fetch itself
    assert.is_true(r.gone)
  end)

  it("token cache: a holder that stores its token between another's read and lock does not cause a second fetch",
    function()
    local r = run([[
      local cache = require("enos.ngx").token_cache("tokens")
      local now = ngx.now() * 1000
      local client = { endpoint = "https://gw2", access_key = "ak", timeout = 2, connect_timeout = 1,
        clock = function() return ngx.now() * 1000 end }
      local other = setmetatable({}, { __index = client })    -- another worker's client
      cache:set(client, { value = "tok-stale", expires_at = now + 60 * 1000, ttl = 7200 })
      assert(cache:get(client).value == "tok-stale")          -- client holds the lock, goes to refresh
      -- other reads the stale token; just before its lock attempt, client stores the new one and lets go
      local real, once = cache.dict, false
      cache.dict = setmetatable({
        add = function(_, ...)
          if not once then
            once = true
            cache.dict = real
            cache:set(client, { value = "tok-new", expires_at = now + 7200 * 1000, ttl = 7200 })
          end
          return real:add(...)
        end,
      }, { __index = function(_, k) return function(_, ...) return real[k](real, ...) end end })
      local got = cache:get(other)
      cache.dict = real
      local locked = real:get("enos:token:https://gw2|ak:lock")
      cache:set(other, nil)
      return { got = got and got.value, interleaved = once, holds = cache.owners[other] ~= nil, locked = locked ~= nil }
    ]])
    assert.is_true(r.interleaved)
    assert.equal("tok-new", r.got)      -- takes the stored token instead of fetching another
    assert.is_false(r.holds)
    assert.is_false(r.locked)           -- and leaves the lock free for the next refresh
  end)

  it("token cache: a worker whose old token was rejected does not drop the newer one another worker stored", function()
    local r = run([[
      local cache = require("enos.ngx").token_cache("tokens")
      local now = ngx.now() * 1000
      local client = { endpoint = "https://gw3", access_key = "ak", clock = function() return ngx.now() * 1000 end }
      cache:set(client, { value = "tok-2", expires_at = now + 7200 * 1000, ttl = 7200 })
      cache:set(client, nil, "tok-1")              -- the gateway refused tok-1: tok-2 is someone else's, newer
      local kept = cache:get(client)
      cache:set(client, nil, "tok-2")              -- the stored one itself refused: dropped
      local after = cache:get(client)
      cache:abort(client)
      return { kept = kept and kept.value, after = after and after.value or "nil" }
    ]])
    assert.equal("tok-2", r.kept)
    assert.equal("nil", r.after)
  end)
end)

describe("examples/nginx against the simulator", function()
  local s, kp, skf, ep, ep_curl

  local function replace(e, body, timeout)
    local st, raw = N.http { method = "POST", url = e.url .. "/replace", body = cjson.encode(body),
      headers = { ["Content-Type"] = "application/json" }, timeout = timeout or 30 }
    return st, decode(raw), raw
  end

  local function device(asset)
    local _, r = s:admin("GET", "/devices/" .. asset)
    return r and r.data
  end

  setup(function()
    kp = H.keypair()
    local devices = {}
    for i = 1, 20 do
      devices[i] = { productKey = "pk_demo", deviceKey = ("old_%02d"):format(i), assetId = ("asset%04d"):format(i) }
    end
    s = sim.start { tls = true, config = {
      apps = { { access_key = "ngx-ak", secret_key = "ngx-sk-0123456789", public_key_file = kp.public_file } },
      devices = devices } }
    skf = kp.dir .. "/secret_key"
    H.writefile(skf, "ngx-sk-0123456789\n", "600")
    ep = N.start_example(s, { secret_key_file = skf, private_key_file = kp.private_file, workers = 2,
      env = { ENOS_ALLOW_SHOW_SECRET = "1", ENOS_SETTLE_MS = "100", ENOS_TIMEOUT = "1" } })
  end)

  teardown(function()
    if ep then ep.stop() end
    if ep_curl then ep_curl.stop() end
    if s then s:stop() end
    if kp then os.execute("rm -rf " .. kp.dir) end
  end)

  it("answers /health", function()
    local st, raw = N.http { url = ep.url .. "/health" }
    assert.equal(200, st)
    assert.is_true(decode(raw).ok)
  end)

  it("replaces by assetId and returns the decrypted secret when asked and allowed", function()
    local st, r, raw = replace(ep, { assetId = "asset0001", newDeviceKey = "new_01", show_secret = true })
    assert.equal(200, st, raw)
    assert.is_true(r.ok)
    assert.equal("replaced", r.outcome)
    assert.equal("new_01", r.new.deviceKey)
    assert.equal("clear", r.new.secret)
    local d = device("asset0001")
    assert.equal("new_01", d.deviceKey)
    assert.equal(d.deviceSecret, r.new.deviceSecret)
    assert.is_string(r.new.encrypted.sessionKey)
    assert.equal("old_01", r.old.deviceKey)
    local names = {}
    for _, step in ipairs(r.steps) do names[#names + 1] = step.name .. ":" .. step.outcome end
    assert.same({ "preflight:ok", "replace:ok", "deliver:ok", "verify:ok" }, names)
  end)

  it("withholds the clear secret unless asked (the encrypted pair is returned)", function()
    local st, r, raw = replace(ep, { productKey = "pk_demo", deviceKey = "old_02", newDeviceKey = "new_02" })
    assert.equal(200, st, raw)
    assert.equal("withheld", r.new.secret)
    assert.is_nil(r.new.deviceSecret)
    assert.is_string(r.new.encrypted.deviceSecret)
    assert.is_nil(raw:find(device("asset0002").deviceSecret, 1, true))
  end)

  it("maps errors to HTTP statuses with a JSON error", function()
    local st, r = replace(ep, { assetId = "no-such-asset", newDeviceKey = "new_x1" })
    assert.equal(404, st)
    assert.same({ false, "not_found", 99400 }, { r.ok, r.error.kind, r.error.code })
    assert.equal("refused", r.report.outcome)

    st, r = replace(ep, { assetId = "asset0003", newDeviceKey = "bad key!" })
    assert.equal(400, st)
    assert.same({ "invalid_argument", "newDeviceKey" }, { r.error.kind, r.error.field })

    st, r = replace(ep, { assetId = "asset0003", newDeviceKey = "old_04" })   -- asset0004 has it
    assert.equal(409, st)
    assert.equal("conflict", r.error.kind)
    assert.equal("old_03", device("asset0003").deviceKey)

    st, r = replace(ep, { assetId = "asset0003", newDeviceKey = "new_03", secret_key = "x" })
    assert.equal(400, st)
    assert.equal("secret_key", r.error.field)

    local raw
    st, raw = N.http { method = "POST", url = ep.url .. "/replace", body = "not json" }
    assert.equal(400, st)
    assert.equal("invalid_argument", decode(raw).error.kind)
    st = N.http { url = ep.url .. "/replace" }
    assert.equal(405, st)
  end)

  it("two concurrent replaces of one asset: one 200, the other 409 conflict naming the key it found", function()
    -- both preflights read old_08 before either replace lands (the simulator holds each replace 400 ms)
    assert.equal(200, (s:admin("POST", "/faults", { latency_ms = 400, match = "replaceDevice", count = 2 })))
    local dir = H.tmpdir()
    local cmds = {}
    for i, key in ipairs { "race_a", "race_b" } do
      H.writefile(dir .. "/b" .. i, cjson.encode { assetId = "asset0008", newDeviceKey = key })
      cmds[i] = ("curl -s -o %s/r%d -w '%%{http_code}' -H 'Content-Type: application/json' --data-binary @%s/b%d " ..
        "%s/replace > %s/s%d"):format(dir, i, dir, i, ep.url, dir, i)
    end
    H.sh(cmds[1] .. " & " .. cmds[2] .. " & wait")
    s:admin("DELETE", "/faults")
    local got = {}
    for i = 1, 2 do got[i] = { tonumber(H.readfile(dir .. "/s" .. i)), decode(H.readfile(dir .. "/r" .. i)) } end
    os.execute("rm -rf " .. dir)
    local winner = got[1][1] == 200 and 1 or 2
    local loser = 3 - winner
    assert.equal(200, got[winner][1])
    assert.equal(409, got[loser][1])
    local won_key = winner == 1 and "race_a" or "race_b"
    assert.equal(won_key, device("asset0008").deviceKey)
    assert.equal("conflict", got[loser][2].error.kind)
    assert.matches(won_key, got[loser][2].error.message, 1, true)
    assert.equal("conflict", got[loser][2].report.outcome)
  end)

  it("answers 504 timeout when the simulator is too slow (latency fault)", function()
    assert.equal(200, (s:admin("POST", "/faults", { latency_ms = 3000, match = "get" })))
    local t0 = sim.now_ms()
    local st, r, raw = replace(ep, { assetId = "asset0005", newDeviceKey = "new_05" })
    local took = sim.now_ms() - t0
    s:admin("DELETE", "/faults")
    assert.equal(504, st, raw)
    assert.equal("timeout", r.error.kind)
    assert.equal("preflight", r.error.step)
    assert.is_true(took < 8000, "took " .. took)
    assert.equal("old_05", device("asset0005").deviceKey)
  end)

  it("recovers from a replace that timed out: reads back, then retries", function()
    assert.equal(200, (s:admin("POST", "/faults", { latency_ms = 2500, match = "replaceDevice", count = 1 })))
    local st, r, raw = replace(ep, { assetId = "asset0006", newDeviceKey = "new_06", show_secret = true })
    s:admin("DELETE", "/faults")
    assert.equal(200, st, raw)
    assert.is_true(r.ok)
    assert.equal(2, r.attempts)
    local outcomes = {}
    for _, step in ipairs(r.steps) do outcomes[#outcomes + 1] = step.name .. ":" .. step.outcome end
    assert.same({ "preflight:ok", "replace:unknown", "reconcile:unchanged", "replace:ok", "deliver:ok", "verify:ok" },
      outcomes)
    assert.equal(device("asset0006").deviceSecret, r.new.deviceSecret)
  end)

  it("refuses show_secret where the config does not allow it, before changing anything", function()
    ep_curl = N.start_example(s, { secret_key_file = skf, private_key_file = kp.private_file,
      env = { ENOS_TRANSPORT = "curl", ENOS_SETTLE_MS = "100" } })
    local st, r = replace(ep_curl, { assetId = "asset0007", newDeviceKey = "new_07", show_secret = true })
    assert.equal(403, st)
    assert.equal("show_secret", r.error.field)
    assert.equal("old_07", device("asset0007").deviceKey)
    -- the same endpoint on the blocking libcurl transport (the bench's comparison) works end to end
    local raw
    st, r, raw = replace(ep_curl, { assetId = "asset0007", newDeviceKey = "new_07" })
    assert.equal(200, st, raw)
    assert.equal("replaced", r.outcome)
    assert.equal("new_07", device("asset0007").deviceKey)
  end)

  it("refreshes the shared token from one worker at a time", function()
    -- a simulator whose tokens live 8 s: clients refresh them 4 s before expiry (half the lifetime), so
    -- each batch has 4 s before its token is due again, even on a loaded machine
    local devs = {}
    for i = 1, 24 do devs[i] = { productKey = "pk_demo", deviceKey = ("rf_%02d"):format(i), assetId = ("rf%04d"):format(i) } end
    local s2 = sim.start { tls = true, config = { token_ttl = 8,
      apps = { { access_key = "rf-ak", secret_key = "ngx-sk-0123456789", public_key_file = kp.public_file } },
      devices = devs } }
    local e
    local ok, err = pcall(function()
      e = N.start_example(s2, { secret_key_file = skf, private_key_file = kp.private_file, workers = 4,
        env = { ENOS_VERIFY = "0", ENOS_CHECK_FREE = "0" } })
      local function batch(from)
        local cmds = {}
        for i = from, from + 7 do
          cmds[#cmds + 1] = ("curl -s -o /dev/null -w '%%{http_code}\\n' -X POST --data-binary %s %s/replace &"):format(
            N.q(cjson.encode { assetId = ("rf%04d"):format(i), newDeviceKey = ("rn_%02d"):format(i) }), e.url)
        end
        local out = H.sh(table.concat(cmds, "\n") .. "\nwait")
        local n = 0
        for c in out:gmatch("%d%d%d") do assert.equal("200", c) n = n + 1 end
        assert.equal(8, n)
      end
      local function token_calls(since)
        local n = 0
        for _, entry in ipairs(s2:log(since)) do
          if entry.op == "token.get" or entry.op == "token.refresh" then n = n + 1 end
        end
        return n
      end
      batch(1)
      assert.equal(1, token_calls(0))
      local _, seq = s2:log(0)
      os.execute("sleep 4.2")                  -- now due for refresh in every worker
      batch(9)
      assert.equal(1, token_calls(seq))
    end)
    if e then e.stop() end
    s2:stop()
    assert(ok, err)
  end)

  it("shares one token between the workers (lua_shared_dict): concurrent replaces fetch it once", function()
    s:admin("POST", "/reset", { tokens = true })
    local e = N.start_example(s, { secret_key_file = skf, private_key_file = kp.private_file, workers = 4,
      env = { ENOS_VERIFY = "0", ENOS_CHECK_FREE = "0" } })
    local ok, err = pcall(function()
      local _, seq0 = s:log(0)
      local cmds = {}
      for i = 10, 19 do
        cmds[#cmds + 1] = ("curl -s -o /dev/null -w '%%{http_code}\\n' -X POST --data-binary %s %s/replace &"):format(
          N.q(cjson.encode { assetId = ("asset%04d"):format(i), newDeviceKey = ("par_%02d"):format(i) }), e.url)
      end
      local out = H.sh(table.concat(cmds, "\n") .. "\nwait")
      local codes = {}
      for c in out:gmatch("%d%d%d") do codes[#codes + 1] = c end
      assert.equal(10, #codes)
      for _, c in ipairs(codes) do assert.equal("200", c) end
      local gets = 0
      for _, entry in ipairs(s:log(seq0)) do
        if entry.op == "token.get" or entry.op == "token.refresh" then gets = gets + 1 end
      end
      assert.equal(1, gets)
    end)
    e.stop()
    assert(ok, err)
  end)
end)
