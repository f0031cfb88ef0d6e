-- The blocking libcurl transport against a real local HTTP server (nginx).
local core = require "enos.core"
local enos = require "enos"
local H = require "helpers"

local LOCATIONS = [[
    location = /ok { default_type application/json; return 200 '{"code":0,"msg":"OK","data":{"v":1}}'; }
    location = /echo {
      content_by_lua_block {
        ngx.req.read_body()
        local h = ngx.req.get_headers()
        ngx.header["X-Method"] = ngx.req.get_method()
        ngx.header["X-Got-Header"] = h["x-test"] or ""
        ngx.header["Set-Cookie"] = { "a=1", "b=2" }
        ngx.say(ngx.req.get_body_data() or "")
      }
    }
    location = /slow { content_by_lua_block { ngx.sleep(2) ngx.say("late") } }
    location = /big { content_by_lua_block { local s = string.rep("x", 65536) for _ = 1, 40 do ngx.print(s) end } }
    location = /redirect { return 302 /ok; }
    location = /drop { return 444; }
    location = /applied_then_drop {
      content_by_lua_block { package.loaded.applied = (package.loaded.applied or 0) + 1 ngx.exit(444) }
    }
    location = /applied { content_by_lua_block { ngx.print(package.loaded.applied or 0) } }
]]

describe("libcurl transport over HTTP", function()
  local srv
  setup(function() srv = H.nginx(LOCATIONS) end)
  teardown(function() if srv then srv.stop() end end)

  it("sends a POST with headers and body and reads status, headers, body", function()
    local t = core.easy { timeout = 5 }
    local res = assert(t:send { method = "POST", url = srv.url .. "/echo", body = '{"a":1}',
      headers = { ["X-Test"] = "hello", ["Content-Type"] = "application/json" } })
    assert.equal(200, res.status)
    assert.equal('{"a":1}\n', res.body)
    assert.equal("POST", res.headers["x-method"])
    assert.equal("hello", res.headers["x-got-header"])
    assert.equal("a=1, b=2", res.headers["set-cookie"])
    t:close()
  end)

  it("reuses one connection across requests (keep-alive)", function()
    local t = core.easy { timeout = 5 }
    local first = assert(t:send { url = srv.url .. "/ok" })
    local second = assert(t:send { url = srv.url .. "/ok" })
    local third = assert(t:send { method = "POST", url = srv.url .. "/echo", body = "x" })
    assert.equal(1, first.new_connections)
    assert.equal(0, second.new_connections)
    assert.equal(0, third.new_connections)
    t:close()
  end)

  -- The server takes the request on a kept-alive connection, then closes it without a reply.
  -- libcurl re-sends such a request by itself; a `once` request (a replace) must reach it once.
  local function applied() return tonumber(core.easy {}:send { url = srv.url .. "/applied" }.body) end
  for _, flavour in ipairs { "easy", "multi" } do
    local function send(t, req)
      if flavour == "easy" then return t:send(req) end
      local id = t:add(req)
      while true do
        for _, d in ipairs(t:wait(1)) do if d.id == id then return d.res, d.err end end
      end
    end
    it(flavour .. ": a request marked once is never re-sent on its own, and keeps the kept-alive connection", function()
      local t = core[flavour] { timeout = 5 }
      local before = applied()
      assert(send(t, { url = srv.url .. "/ok" }))
      local res = assert(send(t, { method = "POST", url = srv.url .. "/echo", body = "abc", once = true }))
      assert.equal(0, res.new_connections)                  -- no new connection per replace
      assert.equal("abc\n", res.body)                       -- the body goes through in full
      local _, err = send(t, { method = "POST", url = srv.url .. "/applied_then_drop", body = "x", once = true })
      assert.equal(1, applied() - before)
      assert.equal("transport", err.kind)
      assert.is_true(err.request_sent)
      assert.matches("may have been applied", err.message)
      -- the same without once: libcurl re-sends it (why replaces are marked once)
      assert(send(t, { url = srv.url .. "/ok" }))
      send(t, { method = "POST", url = srv.url .. "/applied_then_drop", body = "x" })
      assert.equal(3, applied() - before)
      -- the handle is still usable afterwards, for once requests too
      assert.equal("y\n", assert(send(t, { method = "POST", url = srv.url .. "/echo", body = "y", once = true })).body)
      t:close()
    end)
  end

  it("honours the timeout and says timeout", function()
    local t = core.easy { timeout = 0.3 }
    local started = core.monotonic_ms()
    local res, err = t:send { url = srv.url .. "/slow" }
    local took = core.monotonic_ms() - started
    assert.is_nil(res)
    assert.equal("timeout", err.kind)
    assert.is_true(err.request_sent)
    assert.is_true(took < 1500, "took " .. took .. " ms")
    t:close()
  end)

  it("a per-request timeout overrides the handle's", function()
    local t = core.easy { timeout = 30 }
    local _, err = t:send { url = srv.url .. "/slow", timeout = 0.2 }
    assert.equal("timeout", err.kind)
  end)

  it("caps the reply body", function()
    local t = core.easy { timeout = 5, max_body = 1024 * 1024 }
    local res, err = t:send { url = srv.url .. "/big" }
    assert.is_nil(res)
    assert.equal("protocol", err.kind)
    assert.matches("exceeds", err.message)
  end)

  it("does not follow redirects", function()
    local t = core.easy { timeout = 5 }
    local res = assert(t:send { url = srv.url .. "/redirect" })
    assert.equal(302, res.status)
  end)

  it("a dropped connection after the request left is transport with request_sent", function()
    local t = core.easy { timeout = 5 }
    local res, err = t:send { method = "POST", url = srv.url .. "/drop", body = "{}" }
    assert.is_nil(res)
    assert.equal("transport", err.kind)
    assert.is_true(err.request_sent)
  end)

  it("a refused connection is transport and the request never left", function()
    local t = core.easy { timeout = 5 }
    local port = H.free_port()
    local res, err = t:send { url = ("http://127.0.0.1:%d/"):format(port) }
    assert.is_nil(res)
    assert.equal("transport", err.kind)
    assert.is_false(err.request_sent)
  end)

  it("refuses other protocols and header injection", function()
    local t = core.easy { timeout = 5 }
    local res, err = t:send { url = "file:///etc/passwd" }
    assert.is_nil(res)
    assert.equal("config", err.kind)
    assert.has_error(function() t:send { url = srv.url .. "/ok", headers = { ["X-A"] = "v\r\nX-B: injected" } } end)
  end)

  it("is closed idempotently and then refuses to send", function()
    local t = core.easy {}
    t:close()
    t:close()
    assert.has_error(function() t:send { url = srv.url .. "/ok" } end)
    assert.equal("enos.easy (closed)", tostring(t))
  end)
end)

describe("libcurl transport over HTTPS", function()
  local srv
  setup(function() srv = H.nginx(LOCATIONS, true) end)
  teardown(function() if srv then srv.stop() end end)

  it("verifies the peer: an untrusted certificate is a tls error", function()
    local t = core.easy { timeout = 5, cafile = "/etc/ssl/certs/ca-certificates.crt" }
    local res, err = t:send { url = srv.url .. "/ok" }
    assert.is_nil(res)
    assert.equal("tls", err.kind)
  end)

  it("trusts a given CA file", function()
    local t = core.easy { timeout = 5, cafile = srv.cert }
    local res = assert(t:send { url = srv.url .. "/ok" })
    assert.equal(200, res.status)
  end)

  it("checks the host name against the certificate", function()
    local t = core.easy { timeout = 5, cafile = srv.cert }
    local url = srv.url:gsub("127%.0%.0%.1", "localhost")   -- the certificate names only 127.0.0.1
    local res, err = t:send { url = url .. "/ok" }
    assert.is_nil(res)
    assert.equal("tls", err.kind)
  end)

  it("the client reports tls through its error kind", function()
    local c = assert(enos.client { endpoint = srv.url, access_key = "ak", secret_key = "sk", org_id = "o1", timeout = 5 })
    local r, err = c:get_device { assetId = "a1" }
    assert.is_nil(r)
    assert.equal("tls", err.kind)
    c:close()
  end)
end)

describe("parse_headers", function()
  it("lower-cases names, trims values, joins repeats and skips status lines", function()
    local h = core.parse_headers("HTTP/1.1 200 OK\r\nContent-Type:  text/plain \r\nX-A: 1\r\nx-a: 2\r\nbad line\r\n\r\n")
    assert.same({ ["content-type"] = "text/plain", ["x-a"] = "1, 2" }, h)
  end)
end)
