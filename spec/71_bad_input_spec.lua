-- Bad input, table-driven: every argument of the public Lua API, the command line and the batch plan.
-- Misuse (a non-table argument) raises; a bad value returns nil, err with err.kind "invalid_argument"
-- ("config" for client options) and err.field naming it; all of it before any request: the simulator's
-- request log stays empty and no device changes.
local enos = require "enos"
local workflow = require "enos.workflow"
local batch = require "enos.batch"
local cli = require "enos.cli"
local plan_mod = require "enos.plan"
local cjson = require "cjson"
local H = require "helpers"
local sim = dofile("spec/sim_helper.lua")

local ORG = "o15724268424841"
local AK, SK = "bad-input-ak", "bad-input-secret-key"
local LONG = ("x"):rep(10 * 1024)
local NON_UTF8 = "A\255\254\253"

describe("bad input", function()
  local h, kp, dir, snapshot

  setup(function()
    kp = H.keypair()
    dir = H.tmpdir()
    h = sim.start { config = {
      apps = { { access_key = AK, secret_key = SK, public_key_file = kp.public_file } },
      devices = {
        { productKey = "pk_demo", deviceKey = "OLD-0001", assetId = "A001", deviceSecret = "SecretA001xxxxxxxxxx" },
        { productKey = "pk_demo", deviceKey = "OLD-0002", assetId = "A002", deviceSecret = "SecretA002xxxxxxxxxx" },
      } } }
    snapshot = "A001 OLD-0001 SecretA001xxxxxxxxxx inactive|A002 OLD-0002 SecretA002xxxxxxxxxx inactive"
    H.sh(("mkdir -p %s/adir && : > %s/existing.json && ln -s %s/existing.json %s/link.json && "
      .. "ln -s %s/nowhere.json %s/dangling.json"):format(dir, dir, dir, dir, dir, dir))
  end)
  teardown(function()
    if h then h:stop() end
    if dir then os.execute("rm -rf " .. dir) end
  end)
  -- every case starts from the seeded devices and an empty request log
  before_each(function() assert.equal(200, (h:admin("POST", "/reset"))) end)

  local function state()
    local _, r = h:admin("GET", "/devices")
    local out = {}
    for _, d in ipairs(r.data) do out[#out + 1] = table.concat({ d.assetId, d.deviceKey, d.deviceSecret, d.status }, " ") end
    table.sort(out)
    return table.concat(out, "|")
  end

  -- nothing reached the simulator, nothing changed
  local function untouched()
    local log = h:log()
    local ops = {}
    for _, e in ipairs(log) do ops[#ops + 1] = tostring(e.op) end
    assert.equal(0, #log, "requests reached the simulator: " .. table.concat(ops, ","))
    assert.equal(snapshot, state())
  end

  local function base_opts()
    return { endpoint = h.url, access_key = AK, secret_key = SK, org_id = ORG, private_key_file = kp.private_file,
      timeout = 2 }
  end
  local function client() return assert(enos.client(base_opts())) end

  local function show(v)
    if type(v) == "string" then return #v > 40 and (("%q"):format(v:sub(1, 20)) .. "…(" .. #v .. " bytes)") or ("%q"):format(v) end
    return tostring(v)
  end

  -- ------------------------------------------------------------ enos.client options

  describe("enos.client options", function()
    it("raises on a non-table", function()
      assert.has_error(function() enos.client("https://x") end)
      assert.has_error(function() enos.client() end)
    end)
    local CASES = {
      { "endpiont", "https://x.example" },
      { "endpoint", 42 }, { "endpoint", "" }, { "endpoint", "not a url" }, { "endpoint", "ftp://127.0.0.1/" },
      { "endpoint", "http://user:pw@127.0.0.1/" }, { "endpoint", "http://example.com" },
      { "endpoint", "https://x.example/\n" }, { "endpoint", "https://" .. LONG },
      { "access_key", 1 }, { "access_key", "" }, { "access_key", "a\nb" }, { "access_key", LONG },
      { "access_key", NON_UTF8 },
      { "secret_key", 1 }, { "secret_key", "" }, { "secret_key", "s\0k" }, { "secret_key", LONG },
      { "org_id", 1 }, { "org_id", "" }, { "org_id", "o\r\n1" }, { "org_id", LONG }, { "org_id", NON_UTF8 },
      { "timeout", "5" }, { "timeout", 0 }, { "timeout", -1 }, { "timeout", 1e9 }, { "timeout", 0 / 0 },
      { "connect_timeout", "1" }, { "connect_timeout", 0 },
      { "api_version", "v3" }, { "api_version", 2.4 },
      { "cafile", 5 }, { "cafile", "" }, { "cafile", "/nonexistent/ca.pem" }, { "capath", "/nonexistent/certs" },
      { "verify_tls", "no" },
      { "user_agent", 5 }, { "user_agent", "enos\r\nX-Injected: 1" },
      { "max_body", "big" }, { "max_body", 1 }, { "max_body", 2 ^ 40 },
      { "private_key", 42 }, { "private_key", "" }, { "private_key", "not a pem" }, { "private_key", LONG },
      { "private_key_file", "" }, { "private_key_file", "/nonexistent/key.pem" }, { "private_key_file", 7 },
      { "secret_scheme", "bogus" }, { "secret_scheme", { aes_mode = "xts" } }, { "secret_scheme", 5 },
      { "clock", "now" }, { "transport", 5 }, { "transport", "curl" }, { "allow_insecure_http", "yes" },
    }
    for _, case in ipairs(CASES) do
      local field, value = case[1], case[2]
      it(("%s = %s: config error naming %s"):format(field, show(value), field), function()
        local opts = base_opts()
        if field == "private_key" then opts.private_key_file = nil end
        opts[field] = value
        local c, err = enos.client(opts)
        if c then
          -- accepted at creation: then it must still fail before any request, naming the option
          local r
          r, err = c:get_device { assetId = "A001" }
          c:close()
          assert.is_nil(r, "bad option accepted and the call succeeded")
        end
        assert.is_table(err)
        assert.equal("config", err.kind, tostring(err))
        assert.equal(field, err.field, tostring(err))
        untouched()
      end)
    end
    it("private_key and private_key_file together: config naming private_key", function()
      local opts = base_opts()
      opts.private_key = kp.private_pem
      local c, err = enos.client(opts)
      assert.is_nil(c)
      assert.equal("config", err.kind)
      assert.equal("private_key", err.field)
    end)
  end)

  -- ------------------------------------------------------------ call parameters

  describe("replace_device and get_device parameters", function()
    it("raise on a non-table", function()
      local c = client()
      assert.has_error(function() c:replace_device("A001") end)
      assert.has_error(function() c:get_device() end)
      c:close()
    end)
    local REPLACE = {
      { "assetID", { assetID = "A001", newDeviceKey = "NEW-0001" } },
      { "assetId", { assetId = 42, newDeviceKey = "NEW-0001" } },
      { "assetId", { assetId = "", newDeviceKey = "NEW-0001" } },
      { "assetId", { assetId = LONG, newDeviceKey = "NEW-0001" } },
      { "assetId", { assetId = "A0\t01", newDeviceKey = "NEW-0001" } },
      { "assetId", { assetId = NON_UTF8, newDeviceKey = "NEW-0001" } },
      { "assetId", { assetId = "A001", productKey = "pk_demo", newDeviceKey = "NEW-0001" } },
      { "assetId", { newDeviceKey = "NEW-0001" } },
      { "deviceKey", { productKey = "pk_demo", newDeviceKey = "NEW-0001" } },
      { "productKey", { deviceKey = "OLD-0001", newDeviceKey = "NEW-0001" } },
      { "productKey", { productKey = NON_UTF8, deviceKey = "OLD-0001", newDeviceKey = "NEW-0001" } },
      { "deviceKey", { productKey = "pk_demo", deviceKey = "OLD\n0001", newDeviceKey = "NEW-0001" } },
      { "newDeviceKey", { assetId = "A001" } },
      { "newDeviceKey", { assetId = "A001", newDeviceKey = 42 } },
      { "newDeviceKey", { assetId = "A001", newDeviceKey = "" } },
      { "newDeviceKey", { assetId = "A001", newDeviceKey = "abc" } },
      { "newDeviceKey", { assetId = "A001", newDeviceKey = ("k"):rep(65) } },
      { "newDeviceKey", { assetId = "A001", newDeviceKey = LONG } },
      { "newDeviceKey", { assetId = "A001", newDeviceKey = "has space" } },
      { "newDeviceKey", { assetId = "A001", newDeviceKey = "=cmd|' /C calc'!A0" } },
      { "newDeviceKey", { assetId = "A001", newDeviceKey = "k\195\188\195\188y" } },
      { "newDeviceKey", { assetId = "A001", newDeviceKey = NON_UTF8 .. "ab" } },
      { "newDeviceKey", { productKey = "pk_demo", deviceKey = "OLD-0001", newDeviceKey = "OLD-0001" } },
      { "requireSecret", { assetId = "A001", newDeviceKey = "NEW-0001", requireSecret = "true" } },
      { "requireSecret", { assetId = "A001", newDeviceKey = "NEW-0001", requireSecret = 1 } },
      { "orgId", { assetId = "A001", newDeviceKey = "NEW-0001", orgId = "" } },
      { "orgId", { assetId = "A001", newDeviceKey = "NEW-0001", orgId = 42 } },
      { "orgId", { assetId = "A001", newDeviceKey = "NEW-0001", orgId = "o\n1" } },
      { "orgId", { assetId = "A001", newDeviceKey = "NEW-0001", orgId = NON_UTF8 } },
    }
    for i, case in ipairs(REPLACE) do
      it(("replace_device #%d: invalid_argument naming %s"):format(i, case[1]), function()
        local c = client()
        local r, err = c:replace_device(case[2])
        c:close()
        assert.is_nil(r)
        assert.equal("invalid_argument", err.kind, tostring(err))
        assert.equal(case[1], err.field, tostring(err))
        assert.is_false(err.retryable)
        untouched()
      end)
    end
    local GET = {
      { "newDeviceKey", { assetId = "A001", newDeviceKey = "NEW-0001" } },
      { "assetId", { assetId = false } },
      { "assetId", { assetId = NON_UTF8 } },
      { "assetId", { assetId = LONG } },
      { "requireSecret", { assetId = "A001", requireSecret = "yes" } },
      { "orgId", { assetId = "A001", orgId = {} } },
    }
    for i, case in ipairs(GET) do
      it(("get_device #%d: invalid_argument naming %s"):format(i, case[1]), function()
        local c = client()
        local r, err = c:get_device(case[2])
        c:close()
        assert.is_nil(r)
        assert.equal("invalid_argument", err.kind, tostring(err))
        assert.equal(case[1], err.field, tostring(err))
        untouched()
      end)
    end
  end)

  -- ------------------------------------------------------------ pure helpers

  describe("enos.signature, enos.decrypt_secret, enos.load_private_key", function()
    local good = { access_token = "tok", app_secret = "sk", query = { action = "get" }, body = "", timestamp = 1700000000000 }
    local function with(k, v)
      local t = {}
      for a, b in pairs(good) do t[a] = b end
      t[k] = v
      return t
    end
    it("signature raises on a non-table", function()
      assert.has_error(function() enos.signature("tok") end)
      assert.is_string(enos.signature(good))
    end)
    -- a wrong type is misuse (docs/design.md): it raises, and the message names the field
    for _, case in ipairs {
      { "access_token", nil }, { "access_token", 5 }, { "app_secret", nil }, { "app_secret", {} },
      { "timestamp", "soon" }, { "timestamp", -1 }, { "query", "action=get" }, { "query", { a = {} } },
      { "body", 42 },
    } do
      it(("signature with %s = %s raises naming it"):format(case[1], show(case[2])), function()
        local ok, msg = pcall(enos.signature, with(case[1], case[2]))
        assert.is_false(ok, "accepted")
        local name = case[1] == "query" and "query" or case[1]
        assert.truthy(tostring(msg):find(name, 1, true) or (case[1] == "query" and tostring(msg):find("'a'", 1, true)),
          "message does not name " .. name .. ": " .. tostring(msg))
      end)
    end

    it("decrypt_secret raises on a non-table", function()
      assert.has_error(function() enos.decrypt_secret("x") end)
    end)
    for _, case in ipairs {
      { "private_key", { session_key = "abc", secret = "abc" } },
      { "private_key", { private_key = 42, session_key = "abc", secret = "abc" } },
      { "session_key", { private_key = "PEM", secret = "abc" } },
      { "session_key", { private_key = "PEM", session_key = 42, secret = "abc" } },
      { "secret", { private_key = "PEM", session_key = "abc" } },
      { "secret", { private_key = "PEM", session_key = "abc", secret = {} } },
      { "scheme", { private_key = "PEM", session_key = "abc", secret = "abc", scheme = "bogus" } },
    } do
      it("decrypt_secret: invalid_argument naming " .. case[1], function()
        local p = {}
        for k, v in pairs(case[2]) do p[k] = v == "PEM" and kp.private_pem or v end
        local r, err = enos.decrypt_secret(p)
        assert.is_nil(r)
        assert.equal("invalid_argument", err.kind, tostring(err))
        assert.equal(case[1], err.field, tostring(err))
      end)
    end
    it("decrypt_secret: garbage, 10 KB and non-UTF-8 ciphertexts are decrypt errors, not crashes", function()
      for _, v in ipairs { LONG, NON_UTF8, "!!!!", ("A"):rep(344) } do
        local r, err = enos.decrypt_secret { private_key = kp.private_pem, session_key = v, secret = v }
        assert.is_nil(r)
        assert.equal("decrypt", err.kind, tostring(err))
        local r2, err2 = enos.decrypt_secret { private_key = kp.private_pem, session_key = v, secret = v, scheme = "auto" }
        assert.is_nil(r2)
        assert.equal("decrypt", err2.kind, tostring(err2))
      end
    end)

    for _, case in ipairs {
      { "private_key", nil }, { "private_key", 42 }, { "private_key", "" }, { "private_key", "not a pem" },
      { "private_key", LONG }, { "private_key", NON_UTF8 },
      { "private_key", "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n" },
      { "private_key", { path = "x" } },
      { "file", { file = 5 } }, { "file", { file = "" } }, { "file", { file = "/nonexistent/key.pem" } },
      { "file", { file = "/tmp" } },
    } do
      it(("load_private_key(%s): nil, err naming %s"):format(show(case[2]), case[1]), function()
        local ok, k, err = pcall(enos.load_private_key, case[2])
        assert.is_true(ok, "raised: " .. tostring(k))
        assert.is_nil(k)
        assert.truthy(err.kind == "invalid_argument" or err.kind == "config", tostring(err))
        assert.equal(case[1], err.field, tostring(err))
      end)
    end
  end)

  -- ------------------------------------------------------------ workflow options and target

  describe("workflow.replace", function()
    it("raises on a non-table client, target or opts", function()
      local c = client()
      assert.has_error(function() workflow.replace(nil, {}) end)
      assert.has_error(function() workflow.replace(c, "A001") end)
      assert.has_error(function() workflow.replace(c, { assetId = "A001", newDeviceKey = "NEW-0001" }, "fast") end)
      c:close()
    end)
    local T = { assetId = "A001", newDeviceKey = "NEW-0001" }
    local OPTS = {
      { "retries", 3 }, { "max_attempts", 0 }, { "max_attempts", 1.5 }, { "max_attempts", "3" },
      { "read_attempts", 0 }, { "verify_attempts", -1 }, { "backoff_ms", -1 }, { "backoff_max_ms", "x" },
      { "settle_ms", "2000" }, { "poll_ms", -5 }, { "poll_max_ms", {} }, { "wait_active", -1 },
      { "wait_active", "600" }, { "format", "xml" }, { "out", "" }, { "out", 42 }, { "out", dir .. "/adir/" },
      { "require_secret", "yes" }, { "sleep", 5 }, { "clock", "x" }, { "confirm", true }, { "on_step", {} },
      { "dry_run", "no" }, { "overwrite", "no" }, { "verify", "no" }, { "check_free", 0 }, { "record", "x" },
      { "record", { assetId = "B999" } }, { "record", { note = {} } },
    }
    for _, case in ipairs(OPTS) do
      it(("opts.%s = %s: invalid_argument naming it"):format(case[1], show(case[2])), function()
        local c = client()
        local r, err = workflow.replace(c, T, { [case[1]] = case[2], sleep = case[1] == "sleep" and case[2] or function() end })
        c:close()
        assert.is_nil(r)
        assert.equal("invalid_argument", err.kind, tostring(err))
        assert.equal(case[1], err.field, tostring(err))
        untouched()
      end)
    end
    local TARGETS = {
      { "colour", { assetId = "A001", newDeviceKey = "NEW-0001", colour = "red" } },
      { "assetId", { assetId = 42, newDeviceKey = "NEW-0001" } },
      { "assetId", { assetId = "", newDeviceKey = "NEW-0001" } },
      { "assetId", { assetId = LONG, newDeviceKey = "NEW-0001" } },
      { "assetId", { assetId = "A\0001", newDeviceKey = "NEW-0001" } },
      { "assetId", { assetId = NON_UTF8, newDeviceKey = "NEW-0001" } },
      { "assetId", { newDeviceKey = "NEW-0001" } },
      { "newDeviceKey", { assetId = "A001" } },
      { "newDeviceKey", { assetId = "A001", newDeviceKey = "+cmd" } },
      { "newDeviceKey", { assetId = "A001", newDeviceKey = LONG } },
      { "orgId", { assetId = "A001", newDeviceKey = "NEW-0001", orgId = "o\t1" } },
      { "productKey", { productKey = LONG, deviceKey = "OLD-0001", newDeviceKey = "NEW-0001" } },
    }
    for i, case in ipairs(TARGETS) do
      it(("target #%d: invalid_argument naming %s"):format(i, case[1]), function()
        local c = client()
        local r, err = workflow.replace(c, case[2], { sleep = function() end })
        c:close()
        assert.is_nil(r)
        assert.equal("invalid_argument", err.kind, tostring(err))
        assert.equal(case[1], err.field, tostring(err))
        untouched()
      end)
    end
    -- output file names: refused before any request
    local PATHS = {
      { "an existing directory", "/adir" }, { "an existing file", "/existing.json" },
      { "a symlink to a file", "/link.json" }, { "a dangling symlink", "/dangling.json" },
      { "a missing directory", "/missing/x.json" }, { "../ through a missing directory", "/missing/../x.json" },
      { "a directory with a trailing slash", "/adir/" },
    }
    for _, case in ipairs(PATHS) do
      it("out = " .. case[1] .. ": invalid_argument naming out, before any request", function()
        local c = client()
        local r, err = workflow.replace(c, T, { out = dir .. case[2], sleep = function() end })
        c:close()
        assert.is_nil(r)
        assert.equal("invalid_argument", err.kind, tostring(err))
        assert.equal("out", err.field, tostring(err))
        untouched()
        assert.equal("", H.readfile(dir .. "/existing.json"))
      end)
    end
  end)

  -- ------------------------------------------------------------ batch options and plans

  describe("batch", function()
    local function plan_file(name, text)
      local p = dir .. "/" .. name
      H.writefile(p, text)
      return p
    end
    local GOOD = "assetId,newDeviceKey\nA001,NEW-0001\n"

    it("raises on a non-table client and on a plan that is neither a path nor a function", function()
      assert.has_error(function() batch.run(nil, plan_file("g0.csv", GOOD)) end)
      local c = client()
      assert.has_error(function() batch.run(c, 42, { journal = dir .. "/j0" }) end)
      c:close()
    end)

    local OPTS = {
      { "concurency", 4 }, { "concurrency", 0 }, { "concurrency", 1.5 }, { "concurrency", "8" },
      { "concurrency", 5000 }, { "qps", 0 }, { "qps", -1 }, { "qps", "x" }, { "retry_attempts", 0 },
      { "backoff_ms", -1 }, { "backoff_max_ms", "x" }, { "settle_ms", "x" }, { "max_attempts", 0 },
      { "format", "xml" }, { "out", "" }, { "journal", 42 }, { "results", {} }, { "progress", "yes" },
      { "require_secret", "yes" }, { "resume", "yes" }, { "verify", "no" }, { "commit_ms", -1 }, { "commit_ms", "3" },
    }
    for i, case in ipairs(OPTS) do
      it(("opts.%s = %s: invalid_argument naming it, no journal written"):format(case[1], show(case[2])), function()
        local plan = plan_file("opt" .. i .. ".csv", GOOD)
        local opts = { journal = dir .. "/opt" .. i .. ".journal", results = dir .. "/opt" .. i .. ".results.csv" }
        opts[case[1]] = case[2]
        local c = client()
        local s, err = batch.run(c, plan, opts)
        c:close()
        assert.is_nil(s)
        assert.equal("invalid_argument", err.kind, tostring(err))
        assert.equal(case[1], err.field, tostring(err))
        assert.is_nil(io.open(dir .. "/opt" .. i .. ".journal"), "a journal was left behind")
        untouched()
      end)
    end

    local FILES = {
      { "out", "an existing directory", "/adir" }, { "out", "an existing file", "/existing.json" },
      { "out", "a symlink", "/link.json" }, { "out", "a dangling symlink", "/dangling.json" },
      { "out", "a missing directory", "/missing/c.csv" }, { "out", "../ through a missing directory", "/missing/../c.csv" },
      { "journal", "an existing directory", "/adir" }, { "journal", "a missing directory", "/missing/j" },
      { "results", "an existing directory", "/adir" }, { "results", "a symlink", "/link.json" },
      { "results", "a missing directory", "/missing/r.csv" },
    }
    for i, case in ipairs(FILES) do
      it(("%s = %s: invalid_argument naming %s, nothing sent, no journal left"):format(case[1], case[2], case[1]), function()
        local plan = plan_file("files" .. i .. ".csv", GOOD)
        local opts = { journal = dir .. "/files" .. i .. ".journal", results = dir .. "/files" .. i .. ".results.csv",
          out = dir .. "/files" .. i .. ".creds.csv" }
        opts[case[1]] = dir .. case[3]
        local c = client()
        local s, err = batch.run(c, plan, opts)
        c:close()
        assert.is_nil(s)
        assert.equal("invalid_argument", err.kind, tostring(err))
        assert.equal(case[1], err.field, tostring(err))
        if case[1] ~= "journal" then
          assert.is_nil(io.open(dir .. "/files" .. i .. ".journal"), "a journal was left behind")
        end
        assert.equal("", H.readfile(dir .. "/existing.json"))
        untouched()
      end)
    end

    local BOM = "\239\187\191"
    local PLANS = {
      -- CSV
      { "csv", "an empty assetId", "assetId,newDeviceKey\n,NEW-0001\n", 2, "assetId" },
      { "csv", "a 10 KB assetId", "assetId,newDeviceKey\n" .. LONG .. ",NEW-0001\n", 2, "assetId" },
      { "csv", "a 10 KB newDeviceKey", "assetId,newDeviceKey\nA001," .. LONG .. "\n", 2, "newDeviceKey" },
      { "csv", "an escape sequence in assetId", "assetId,newDeviceKey\nA\27[31m1,NEW-0001\n", 2, "assetId" },
      { "csv", "a NUL in productKey", "productKey,deviceKey,newDeviceKey\npk\0demo,OLD-0001,NEW-0001\n", 2, "productKey" },
      { "csv", "non-UTF-8 in assetId", "assetId,newDeviceKey\n" .. NON_UTF8 .. ",NEW-0001\n", 2, "assetId" },
      { "csv", "non-UTF-8 in orgId", "assetId,newDeviceKey,orgId\nA001,NEW-0001," .. NON_UTF8 .. "\n", 2, "orgId" },
      { "csv", "=cmd as newDeviceKey", "assetId,newDeviceKey\nA001,=cmd|' /C calc'!A0\n", 2, "newDeviceKey" },
      { "csv", "@cmd as newDeviceKey", "assetId,newDeviceKey\nA001,@SUM(1+1)\n", 2, "newDeviceKey" },
      { "csv", "a control character in an extra column", "assetId,newDeviceKey,site\nA001,NEW-0001,a\1b\n", 2, "site" },
      { "csv", "non-UTF-8 in an extra column", "assetId,newDeviceKey,site\nA001,NEW-0001," .. NON_UTF8 .. "\n", 2, "site" },
      { "csv", "a 10 KB extra column", "assetId,newDeviceKey,site\nA001,NEW-0001," .. LONG .. "\n", 2, "site" },
      { "csv", "a BOM and then a bad row", BOM .. "assetId,newDeviceKey\nA001,ab\n", 2, "newDeviceKey" },
      { "csv", "a repeated column (a spreadsheet export)", "productKey,deviceKey,newDeviceKey,deviceKey\n" ..
        "pk_demo,OLD-0001,NEW-0001,OLD-0002\n", 1, "deviceKey appears twice" },
      { "csv", "a known column in another case", "assetId,NewDeviceKey,newDeviceKey\nA001,x,NEW-0001\n", 1,
        "did you mean newDeviceKey" },
      { "csv", "an output's column name", "assetId,newDeviceKey,deviceSecret\nA001,NEW-0001,s3cret\n", 1,
        "deviceSecret" },
      { "csv", "a 100 KB line", "assetId,newDeviceKey,site\nA001,NEW-0001," .. string.rep(LONG, 10) .. "\n", 2,
        "longer than 65536" },
      -- JSON Lines
      { "jsonl", "a number for assetId", '{"assetId":123,"newDeviceKey":"NEW-0001"}\n', 1, "assetId" },
      { "jsonl", "an empty assetId", '{"assetId":"","newDeviceKey":"NEW-0001"}\n', 1, "assetId" },
      { "jsonl", "null for assetId", '{"assetId":null,"newDeviceKey":"NEW-0001"}\n', 1, "assetId" },
      { "jsonl", "an object for assetId", '{"assetId":{"x":1},"newDeviceKey":"NEW-0001"}\n', 1, "assetId" },
      { "jsonl", "a boolean newDeviceKey", '{"assetId":"A001","newDeviceKey":true}\n', 1, "newDeviceKey" },
      { "jsonl", "an escaped control character", '{"assetId":"A\\u00010","newDeviceKey":"NEW-0001"}\n', 1, "assetId" },
      { "jsonl", "raw non-UTF-8 bytes", '{"assetId":"' .. NON_UTF8 .. '","newDeviceKey":"NEW-0001"}\n', 1, "assetId" },
      { "jsonl", "a 10 KB assetId", '{"assetId":"' .. LONG .. '","newDeviceKey":"NEW-0001"}\n', 1, "assetId" },
      { "jsonl", "an object in an extra field", '{"assetId":"A001","newDeviceKey":"NEW-0001","site":{"a":1}}\n', 1, "site" },
      { "jsonl", "an array line", '[1,2]\n', 1, "object" },
      { "jsonl", "+cmd as newDeviceKey", '{"assetId":"A001","newDeviceKey":"+cmd"}\n', 1, "newDeviceKey" },
      { "jsonl", "a repeated key", '{"assetId":"A001","newDeviceKey":"NEW-0001","assetId":"A002"}\n', 1,
        "assetId appears twice" },
      { "jsonl", "NaN in an extra field", '{"assetId":"A001","newDeviceKey":"NEW-0001","w":NaN}\n', 1, "w is not a finite" },
      { "jsonl", "Infinity in an extra field", '{"assetId":"A001","newDeviceKey":"NEW-0001","w":-Infinity}\n', 1,
        "w is not a finite" },
      { "jsonl", "1e999 in an extra field", '{"assetId":"A001","newDeviceKey":"NEW-0001","w":1e999}\n', 1,
        "w is not a finite" },
      { "jsonl", "an output's field name", '{"assetId":"A001","newDeviceKey":"NEW-0001","outcome":"done"}\n', 1,
        "outcome" },
    }
    for i, case in ipairs(PLANS) do
      it(("%s plan with %s: an error at line %d naming %s, nothing sent"):format(case[1], case[2], case[4], case[5]), function()
        local plan = plan_file("plan" .. i .. "." .. case[1], case[3])
        local chk = assert(batch.check(plan))
        local found
        for _, e in ipairs(chk.errors) do
          if e.line == case[4] and e.message:find(case[5], 1, true) then found = e end
        end
        assert.is_table(found, "no error naming " .. case[5] .. " at line " .. case[4] .. ": " .. cjson.encode(chk.errors))
        assert.falsy(found.message:find(LONG, 1, true), "the error echoes the whole 10 KB value")
        local c = client()
        local s, err = batch.run(c, plan, { journal = dir .. "/plan" .. i .. ".journal" })
        c:close()
        assert.is_nil(s)
        assert.equal("invalid_argument", err.kind)
        assert.is_table(err.check)
        assert.is_nil(io.open(dir .. "/plan" .. i .. ".journal"), "a journal was left behind")
        untouched()
      end)
    end

    it("formula cells (=, +, -, @) come out neutralised in the credentials and results files", function()
      local plan = plan_file("inject.csv", "assetId,newDeviceKey,site,note\n"
        .. "A001,NEW-0001,=cmd|' /C calc'!A0,+1+2\n"
        .. "A002,NEW-0002,@SUM(1+1),-2+3\n"
        .. "@SUM(1+1),NEW-0003,\"=HYPERLINK(\"\"http://x\"\")\",ok\n")
      local c = client()
      local s = assert(batch.run(c, plan, { journal = dir .. "/inject.journal", out = dir .. "/inject.creds.csv",
        results = dir .. "/inject.results.csv", concurrency = 1, settle_ms = 0 }))
      c:close()
      assert.equal(2, s.done)
      assert.equal(1, s.failed)
      local function rows(path)
        local out = {}
        for line in io.lines(path) do out[#out + 1] = plan_mod.split_csv(line) end
        return out
      end
      local creds, results = rows(dir .. "/inject.creds.csv"), rows(dir .. "/inject.results.csv")
      for _, r in ipairs { creds, results } do
        for i = 2, #r do
          for _, cell in ipairs(r[i]) do
            assert.falsy(cell:match("^[=+@]") or cell:match("^%-%d"), "formula cell " .. cell)
          end
        end
      end
      local text = H.readfile(dir .. "/inject.creds.csv") .. H.readfile(dir .. "/inject.results.csv")
      assert.truthy(text:find("'=cmd|' /C calc'!A0", 1, true))
      assert.truthy(text:find("'@SUM(1+1)", 1, true))
      assert.truthy(text:find("'+1+2", 1, true))
      assert.truthy(text:find("'-2+3", 1, true))
      assert.truthy(text:find("'=HYPERLINK(\"\"http://x\"\")", 1, true))
      h:admin("POST", "/reset")
    end)
  end)

  -- ------------------------------------------------------------ the command line

  describe("enos-replace", function()
    local function env()
      return { HOME = dir .. "/home", ENOS_CONFIG = dir .. "/no-profile", ENOS_ENDPOINT = h.url, ENOS_ACCESS_KEY = AK,
        ENOS_SECRET_KEY = SK, ENOS_ORG_ID = ORG, ENOS_PRIVATE_KEY_FILE = kp.private_file }
    end
    local function run(argv)
      local o, e = {}, {}
      local code = cli.main { argv = argv, env = env(), isatty = false, stdout = function(s) o[#o + 1] = s end,
        stderr = function(s) e[#e + 1] = s end, stdin = function() return nil end, sleep = function() end }
      return code, table.concat(o), table.concat(e)
    end
    local plan = function()
      local p = dir .. "/cli-plan.csv"
      H.writefile(p, "assetId,newDeviceKey\nA001,NEW-0001\n")
      return p
    end
    local D = { "device", "--asset-id", "A001", "--new-key", "NEW-0001", "--yes", "--out" }
    local function dev(extra, out)
      local a = {}
      for _, v in ipairs(D) do a[#a + 1] = v end
      a[#a + 1] = out or (dir .. "/cli-" .. tostring(math.random(1e9)) .. ".json")
      for _, v in ipairs(extra or {}) do a[#a + 1] = v end
      return a
    end
    -- argv, exit code, a pattern stderr must match (the flag or field it names)
    local CASES = {
      { {}, 2, "command" },
      { { "frobnicate" }, 2, "frobnicate" },
      { { "device" }, 2, "asset%-id" },
      { { "device", "--asset-id" }, 2, "asset%-id" },
      { { "device", "--asset-id", "A001" }, 2, "new%-key" },
      { { "device", "--asset-id", "A001", "--new-key" }, 2, "new%-key" },
      { { "device", "--asset-id", "A001", "--new-key", "", "--yes" }, 2, "new%-key" },
      { { "device", "--asset-id", "A001", "--new-key", "ab", "--yes" }, 2, "new%-key" },
      { { "device", "--asset-id", "A001", "--new-key", LONG, "--yes" }, 2, "new%-key" },
      { { "device", "--asset-id", "A001", "--new-key", "=cmd", "--yes" }, 2, "new%-key" },
      { { "device", "--asset-id", "A001", "--new-key", NON_UTF8, "--yes" }, 2, "new%-key" },
      { dev { "--bogus" }, 2, "bogus" },
      { { "device", "--asset-id", "", "--new-key", "NEW-0001", "--yes", "--no-secret" }, 2, "[Aa]sset.?[Ii]d" },
      { { "device", "--asset-id", LONG, "--new-key", "NEW-0001", "--yes", "--no-secret" }, 2, "[Aa]sset.?[Ii]d" },
      { { "device", "--asset-id", "A\n001", "--new-key", "NEW-0001", "--yes", "--no-secret" }, 2, "[Aa]sset.?[Ii]d" },
      { { "device", "--asset-id", NON_UTF8, "--new-key", "NEW-0001", "--yes", "--no-secret" }, 2, "[Aa]sset.?[Ii]d" },
      { { "device", "--product-key", "pk_demo", "--new-key", "NEW-0001", "--yes" }, 2, "device%-key" },
      { { "device", "--asset-id", "A001", "--product-key", "pk_demo", "--device-key", "OLD-0001", "--new-key",
        "NEW-0001", "--yes" }, 2, "asset%-id" },
      { dev { "--timeout", "abc" }, 2, "timeout" },
      { dev { "--timeout", "0" }, 2, "timeout" },
      { dev { "--timeout", "-1" }, 2, "timeout" },
      { dev { "--wait-active", "soon" }, 2, "wait%-active" },
      { dev { "--max-attempts", "0" }, 2, "max%-attempts" },
      { dev { "--max-attempts", "1.5" }, 2, "max%-attempts" },
      { dev { "--format", "xml" }, 2, "format" },
      { dev { "--api-version", "v3" }, 2, "api%-version" },
      { { "device", "--asset-id", "A001", "--new-key", "NEW-0001", "--yes", "--format", "env" }, 2, "out" },
      { dev({}, dir .. "/adir"), 2, "adir" },
      { dev({}, dir .. "/existing.json"), 2, "existing.json" },
      { dev({}, dir .. "/link.json"), 2, "link.json" },
      { dev({}, dir .. "/dangling.json"), 2, "dangling.json" },
      { dev({}, dir .. "/missing/x.json"), 2, "missing" },
      { dev({}, dir .. "/missing/../x.json"), 2, "missing" },
      { dev { "--endpoint", "" }, 3, "endpoint" },
      { dev { "--endpoint", "ftp://127.0.0.1/" }, 3, "endpoint" },
      { dev { "--endpoint", "http://example.com" }, 3, "endpoint" },
      { dev { "--private-key-file", dir .. "/missing/key.pem" }, 3, "private" },
      { dev { "--access-key", "" }, 3, "access" },
      { dev { "--org-id", "o\n1" }, 3, "org" },
      -- get
      { { "get" }, 2, "asset%-id" },
      { { "get", "--asset-id", "A001", "--out", dir .. "/g.json" }, 2, "secret" },
      { { "get", "--asset-id", "A001", "--secret" }, 2, "out" },
      { { "get", "--asset-id", "A001", "--secret", "--out", dir .. "/adir" }, 2, "adir" },
      { { "get", "--asset-id", "A001", "--secret", "--out", dir .. "/link.json" }, 2, "link.json" },
      { { "get", "--asset-id", "A001", "--secret", "--out", dir .. "/missing/g.json" }, 2, "missing" },
      { { "get", "--asset-id", "A001", "--format", "yaml" }, 2, "format" },
      { { "get", "--asset-id", NON_UTF8 }, 2, "[Aa]sset.?[Ii]d" },
      { { "get", "--asset-id", "A001", "--timeout", "x" }, 2, "timeout" },
      -- config
      { { "config", "--bogus" }, 2, "bogus" },
      { { "config", "--timeout", "never" }, 2, "timeout" },
      -- batch
      { { "batch" }, 2, "plan" },
      { { "batch", dir .. "/missing/plan.csv", "--check" }, 2, "plan" },
      { { "batch", dir .. "/adir", "--check" }, 2, "adir" },
      { { "batch", "PLAN", "--concurrency", "0", "--yes" }, 2, "concurrency" },
      { { "batch", "PLAN", "--concurrency", "1.5", "--yes" }, 2, "concurrency" },
      { { "batch", "PLAN", "--concurrency", "many", "--yes" }, 2, "concurrency" },
      { { "batch", "PLAN", "--concurrency", "5000", "--yes" }, 2, "concurrency" },
      { { "batch", "PLAN", "--qps", "0", "--yes" }, 2, "qps" },
      { { "batch", "PLAN", "--qps", "-3", "--yes" }, 2, "qps" },
      { { "batch", "PLAN", "--bogus" }, 2, "bogus" },
      { { "batch", "PLAN", "--yes", "--out", dir .. "/adir" }, 2, "%-%-out" },
      { { "batch", "PLAN", "--yes", "--out", dir .. "/existing.json" }, 2, "%-%-out" },
      { { "batch", "PLAN", "--yes", "--out", dir .. "/link.json" }, 2, "%-%-out" },
      { { "batch", "PLAN", "--yes", "--out", dir .. "/missing/c.csv" }, 2, "%-%-out" },
      { { "batch", "PLAN", "--yes", "--out", dir .. "/c.csv", "--journal", dir .. "/adir" }, 2, "%-%-journal" },
      { { "batch", "PLAN", "--yes", "--out", dir .. "/c2.csv", "--results", dir .. "/missing/r.csv" }, 2, "%-%-results" },
      { { "batch", "PLAN", "--yes", "--out", dir .. "/c3.csv", "--endpoint", "" }, 3, "endpoint" },
    }
    for i, case in ipairs(CASES) do
      local shown = {}
      for j, a in ipairs(case[1]) do shown[j] = (#a > 40 or a:find("[%c\128-\255]")) and show(a) or a end
      it(("#%d %s: exit %d naming %s"):format(i, table.concat(shown, " "):gsub(dir, "DIR"), case[2], case[3]), function()
        local argv = {}
        for j, a in ipairs(case[1]) do argv[j] = a == "PLAN" and plan() or a end
        local journal = dir .. "/cli-plan.csv.journal"
        os.remove(journal)
        local code, out, err = run(argv)
        assert.equal(case[2], code, "stderr: " .. err .. "\nstdout: " .. out)
        assert.truthy(err:find(case[3]), "stderr does not name " .. case[3] .. ": " .. err)
        assert.falsy(err:find(LONG, 1, true), "stderr echoes the whole 10 KB value")
        assert.falsy(err:find(SK, 1, true))
        assert.is_nil(io.open(journal), "a journal was left behind")
        assert.equal("", H.readfile(dir .. "/existing.json"))
        untouched()
      end)
    end
  end)
end)
