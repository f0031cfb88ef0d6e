-- The concurrent transport: libcurl multi under the coroutine scheduler.
local core = require "enos.core"
local enos = require "enos"
local scheduler = require "enos.scheduler"
local H = require "helpers"

local LOCATIONS = [[
    location = /apim-token-service/v2.0/token/get {
      content_by_lua_block { ngx.sleep(0.1) ngx.say('{"status":0,"msg":"SUCCESS","data":{"accessToken":"tok","expire":7200}}') }
    }
    location = /connect-service/v2.4/devices {
      content_by_lua_block {
        ngx.sleep(0.3)
        local a = ngx.req.get_uri_args()
        ngx.say('{"code":0,"msg":"OK","requestId":"r","data":{"assetId":"' .. a.assetId .. '","deviceKey":"k"}}')
      }
    }
    location = /fast { return 200 'ok'; }
    location = /drop { return 444; }
    location = /hang { content_by_lua_block { ngx.sleep(10) ngx.say('late') } }
    location = /close { content_by_lua_block { ngx.header["Connection"] = "close" ngx.say(ngx.var.arg_i) } }
]]

describe("libcurl multi + scheduler", function()
  local srv
  setup(function() srv = H.nginx(LOCATIONS) end)
  teardown(function() if srv then srv.stop() end end)

  it("runs transfers concurrently: 10 slow calls take about one call's time", function()
    local s = scheduler.new { timeout = 5 }
    local results = {}
    local started = core.monotonic_ms()
    for i = 1, 10 do
      s:spawn(function()
        local res, err = s.transport:send { url = srv.url .. "/connect-service/v2.4/devices?assetId=a" .. i }
        results[i] = res and res.status or err.kind
      end)
    end
    assert(s:run())
    local took = core.monotonic_ms() - started
    for i = 1, 10 do assert.equal(200, results[i]) end
    assert.is_true(took < 1500, "took " .. took .. " ms for 10 x 300 ms")
    s:close()
  end)

  it("reuses connections across sequential transfers", function()
    local s = scheduler.new { timeout = 5 }
    local news = {}
    s:spawn(function()
      for i = 1, 5 do news[i] = assert(s.transport:send { url = srv.url .. "/fast" }).new_connections end
    end)
    assert(s:run())
    assert.equal(1, news[1])
    for i = 2, 5 do assert.equal(0, news[i]) end
  end)

  it("reports transport errors per transfer and keeps going", function()
    local s = scheduler.new { timeout = 5 }
    local out = {}
    s:spawn(function() local _, e = s.transport:send { method = "POST", url = srv.url .. "/drop", body = "x" } out.drop = e end)
    s:spawn(function() out.ok = s.transport:send { url = srv.url .. "/fast" } end)
    assert(s:run())
    assert.equal("transport", out.drop.kind)
    assert.is_true(out.drop.request_sent)
    assert.equal("ok", out.ok.body)
  end)

  describe("the event loop (libcurl's socket API over epoll)", function()
    it("a request's timeout fires while its socket stays silent", function()
      local m = core.multi { timeout = 0.3 }
      local id = m:add { url = srv.url .. "/hang" }
      local t0, done = core.monotonic_ms(), nil
      while not done and core.monotonic_ms() - t0 < 5000 do
        for _, d in ipairs(m:wait(1)) do if d.id == id then done = d end end
      end
      local took = core.monotonic_ms() - t0
      assert.is_table(done, "no completion within 5 s")
      assert.equal("timeout", done.err.kind)
      assert.is_true(took >= 250 and took < 2000, "took " .. took .. " ms for a 300 ms timeout")
      assert.equal(0, m:pending())
      m:close()
    end)

    it("an idle wait sleeps its time, and a finished worker job ends it at once", function()
      local m = core.multi {}
      local t0 = core.monotonic_ms()
      assert.same({}, m:wait(0.2))
      local idle = core.monotonic_ms() - t0
      assert.is_true(idle >= 180, "an idle wait(0.2) returned after " .. idle .. " ms")
      local dir = H.tmpdir()
      local f = assert(core.open_file(dir .. "/j", "excl"))
      local id = m:fsync(f)
      t0 = core.monotonic_ms()
      local got = {}
      while #got == 0 and core.monotonic_ms() - t0 < 10000 do got = m:wait(5) end
      local took = core.monotonic_ms() - t0
      assert.equal(id, got[1] and got[1].id)
      assert.is_true(took < 2000, "the job's wake-up took " .. took .. " ms (a wait(5) slept through it)")
      f:close()
      m:close()
    end)

    it("200 transfers, 64 at a time, on connections the server closes after each reply", function()
      -- (descriptor numbers come back for new sockets again and again: the epoll set must follow)
      local s = scheduler.new { timeout = 5, max_connections = 64 }
      local got, news = {}, 0
      for w = 1, 64 do
        s:spawn(function()
          for i = w, 200, 64 do
            local res, err = s.transport:send { url = srv.url .. "/close?i=" .. i }
            got[i] = res and res.body or err.kind
            if res then news = news + res.new_connections end
          end
        end)
      end
      assert(s:run())
      for i = 1, 200 do assert.equal(i .. "\n", got[i]) end
      assert.equal(200, news)               -- every one on a new connection
      s:close()
    end)
  end)

  it("sleep yields to other tasks", function()
    local s = scheduler.new {}
    local order = {}
    s:spawn(function() s:sleep(0.2) order[#order + 1] = "slow" end)
    s:spawn(function() s:sleep(0.05) order[#order + 1] = "fast" end)
    local t0 = core.monotonic_ms()
    assert(s:run())
    assert.same({ "fast", "slow" }, order)
    assert.is_true(core.monotonic_ms() - t0 < 600)
  end)

  it("a task error is reported, not swallowed", function()
    local s = scheduler.new {}
    s:spawn(function() error("boom") end)
    local ok, err = s:run()
    assert.is_false(ok)
    assert.matches("boom", err)
  end)

  it("many coroutines share one client and fetch the token once (single flight)", function()
    local s = scheduler.new { timeout = 5 }
    local token_requests = 0
    local counting = {
      send = function(_, req)
        if req.url:find("token", 1, true) then token_requests = token_requests + 1 end
        return s.transport:send(req)
      end,
      wait_for = function(_, pred) return s:wait_for(pred) end,
    }
    local c = assert(enos.client { endpoint = srv.url, access_key = "ak", secret_key = "sk", org_id = "o1",
      transport = counting })
    local got = {}
    for i = 1, 20 do
      s:spawn(function()
        local d, err = c:get_device { assetId = "a" .. i }
        got[i] = d and d.assetId or tostring(err)
      end)
    end
    local t0 = core.monotonic_ms()
    assert(s:run())
    for i = 1, 20 do assert.equal("a" .. i, got[i]) end
    assert.equal(1, token_requests)
    assert.is_true(core.monotonic_ms() - t0 < 2000)
  end)

  it("send outside a task blocks until done", function()
    local s = scheduler.new { timeout = 5 }
    local res = assert(s.transport:send { url = srv.url .. "/fast" })
    assert.equal(200, res.status)
  end)

  describe("worker thread (decryption and fsync off the event loop)", function()
    local SECRET = "Wk9vPnz4QbSecretForWorker01"
    local kp, key
    setup(function()
      kp = H.keypair()
      key = assert(core.load_private_key(kp.private_pem))
    end)
    local function collect(m, id)
      for _ = 1, 200 do
        for _, d in ipairs(m:wait(0.05)) do if d.id == id then return d end end
      end
      error("job " .. id .. " never completed")
    end

    it("multi:decrypt gives the plaintext core.decrypt_secret gives, or a decrypt error", function()
      local m = core.multi {}
      local sk, ds = H.encrypt_secret(kp.public_file, SECRET)
      local id = m:decrypt(key, sk, ds, "pkcs1", "ecb", "raw", "base64")
      assert.equal(1, m:pending())
      local d = collect(m, id)
      assert.equal(SECRET, d.res)
      assert.equal(core.decrypt_secret(key, sk, ds, "pkcs1", "ecb", "raw", "base64"), d.res)
      assert.equal(0, m:pending())
      local other = assert(core.load_private_key(H.keypair(1024).private_pem))
      local bad = collect(m, m:decrypt(other, sk, ds, "pkcs1", "ecb", "raw", "base64"))
      assert.is_nil(bad.res)
      assert.equal("decrypt", bad.err.kind)
      assert.is_string(bad.err.message)
      assert.has_error(function() m:decrypt(key, sk, ds, "nope", "ecb", "raw", "base64") end)
      m:close()
    end)

    it("multi:fsync syncs an enos.file; the file may be closed meanwhile; close with jobs queued is clean", function()
      local dir = H.tmpdir()
      local m = core.multi {}
      local f = assert(core.open_file(dir .. "/j", "excl"))
      assert(f:write("line\n"))
      local id = m:fsync(f)
      f:close()                                   -- the job works on its own descriptor
      local d = collect(m, id)
      assert.is_true(d.res)
      assert.has_error(function() m:fsync(f) end)  -- closed: refused at once
      local g = assert(core.open_file(dir .. "/k", "excl"))
      for _ = 1, 20 do m:fsync(g) end
      m:close()                                   -- joins the thread, frees what was queued
      g:close()
      assert.equal("line\n", H.readfile(dir .. "/j"))
    end)

    it("a task's decryption yields: other tasks run while it is being done", function()
      local s = scheduler.new {}
      local sk, ds = H.encrypt_secret(kp.public_file, SECRET)
      local other_ran, seen, plain
      s:spawn(function()
        plain = s:decrypt(key, sk, ds, "pkcs1", "ecb", "raw", "base64")
        seen = other_ran
      end)
      s:spawn(function() other_ran = true end)
      assert(s:run())
      assert.equal(SECRET, plain)
      assert.is_true(seen)            -- a blocking decrypt would have finished before the other task ran
      local _, err = s:decrypt(key, sk, "AAAA", "pkcs1", "ecb", "raw", "base64")   -- outside a task: in place
      assert.is_string(err)
      s:close()
    end)

    it("a client on the scheduler's transport decrypts replace results in the worker", function()
      local s = scheduler.new {}
      local decrypts = 0
      local t = { send = function(_, req) return s.transport:send(req) end,
        decrypt = function(_, ...) decrypts = decrypts + 1 return s:decrypt(...) end }
      local sk, ds = H.encrypt_secret(kp.public_file, SECRET)
      local stub = H.stub(function() return H.envelope { assetId = "A1", deviceKey = "NEW-1", productKey = "pk",
        deviceSecret = ds, sessionKey = sk } end)
      t.send = function(_, req) return stub:send(req) end
      local c = assert(enos.client { endpoint = "https://gw.example.com", access_key = "ak", secret_key = "sk",
        org_id = "o1", private_key = kp.private_pem, transport = t })
      local r
      s:spawn(function() r = assert(c:replace_device { assetId = "A1", newDeviceKey = "NEW-1", requireSecret = true }) end)
      assert(s:run())
      assert.equal(SECRET, r.deviceSecret)
      assert.equal(1, decrypts)
      s:close()
    end)
  end)

  it("close is idempotent", function()
    local m = core.multi {}
    m:close()
    m:close()
    assert.equal("enos.multi (closed)", tostring(m))
    assert.has_error(function() m:add { url = "http://127.0.0.1/" } end)
  end)
end)
