-- The gateway's token rules, what the platform sends treated as data, and nothing unbounded: every shape of
-- "token refused" gets one fresh token and one re-send; a wrong endpoint is a configuration error; codes print
-- as integers; escape sequences in a reply never reach the terminal; a timeout below 1 ms, a FIFO or a device
-- given as a key, profile, CA or output file, and a day-long Retry-After are refused or bounded.
local enos = require "enos"
local workflow = require "enos.workflow"
local cli = require "enos.cli"
local cjson = require "cjson"
local H = require "helpers"

local ORG = "o15724268424841"
local INTERP = type(jit) == "table" and "luajit" or "lua5.4"

local function client(stub, extra)
  local o = { endpoint = "https://gw.example.com", access_key = "ak-123456", secret_key = "super-secret-key-xyz",
    org_id = ORG, transport = stub }
  for k, v in pairs(extra or {}) do o[k] = v end
  return assert(enos.client(o))
end

local function replace_ok(req)
  local body = cjson.decode(req.body)
  return H.envelope { assetId = "a1", productKey = "pk", deviceKey = body.newDeviceKey }
end

describe("token refused by the gateway", function()
  local shapes = {
    { "a bare 401 without a body", { status = 401, headers = {}, body = "" } },
    { "a 401 {\"msg\":\"Unauthorized\"}", { status = 401, headers = {}, body = '{"msg":"Unauthorized"}' } },
    { "HTTP 200 with apim_status 4011 (refresh)", { status = 200, headers = {}, body = '{"apim_status":4011,"msg":"refresh"}' } },
    { "HTTP 200 with apim_status 4012 (get anew)", { status = 200, headers = {}, body = '{"apim_status":"4012"}' } },
    { "code 1203", H.envelope(nil, 1203, "access token expired") },
  }
  for _, shape in ipairs(shapes) do
    it(shape[1] .. ": one fresh token, the replace sent once more, success", function()
      local calls = 0
      local stub = H.stub(function(req)
        calls = calls + 1
        if calls == 1 then return shape[2] end
        return replace_ok(req)
      end)
      local c = client(stub)
      local r = assert(c:replace_device { assetId = "a1", newDeviceKey = "key-0001" })
      assert.equal("key-0001", r.deviceKey)
      assert.equal(2, #stub:api_requests())
      assert.equal(2, stub.token_requests)
      assert.are_not.equal(stub:api_requests()[1].headers["apim-accesstoken"], stub:api_requests()[2].headers["apim-accesstoken"])
    end)

    it(shape[1] .. " twice: auth, the replace sent twice at most", function()
      local stub = H.stub(function() return shape[2] end)
      local _, err = client(stub):replace_device { assetId = "a1", newDeviceKey = "key-0001" }
      assert.equal("auth", err.kind)
      assert.equal(2, #stub:api_requests())
    end)
  end
end)

describe("what the platform says", function()
  it("a wrong endpoint path (an HTML 404) is config, exit 3: not 'device not found'", function()
    local stub = H.stub(function()
      return { status = 404, headers = {}, body = "<html><body><h1>404 Not Found</h1></body></html>" }
    end)
    local _, err = client(stub):get_device { assetId = "a1" }
    assert.equal("config", err.kind)
    assert.matches("not an EnOS API endpoint: https://gw.example.com/connect%-service/v2.4/devices answered HTTP 404",
      err.message)
    assert.equal(3, cli.exit_code(err))
    -- the token service's path too
    local t = H.stub(function() end, { token_handler = function() return { status = 404, headers = {}, body = "nope" } end })
    _, err = client(t):get_device { assetId = "a1" }
    assert.equal("config", err.kind)
    -- through the command: exit 3
    local e = {}
    local code = cli.main { argv = { "get", "--asset-id", "a1" }, env = { ENOS_ENDPOINT = "https://gw.example.com",
      ENOS_ACCESS_KEY = "ak", ENOS_SECRET_KEY = "sk", ENOS_ORG_ID = ORG, ENOS_CONFIG = "/nonexistent" },
      stdout = function() end, stderr = function(x) e[#e + 1] = x end, client_options = { transport = stub } }
    assert.equal(3, code, table.concat(e))
    assert.matches("not an EnOS API endpoint", table.concat(e), 1, true)
  end)

  it("token-service codes print as integers (1003, not 1003.0)", function()
    local stub = H.stub(function() end, { token_handler = function()
      return { status = 200, headers = {}, body = '{"status":1003,"msg":"encryption invalid"}' }
    end })
    local _, err = client(stub):get_device { assetId = "a1" }
    assert.equal("auth", err.kind)
    assert.equal("enos: auth 1003 token service: encryption invalid (check the secret key)", tostring(err))
    assert.equal(math.type and "integer" or "number", math.type and math.type(err.code) or type(err.code))
  end)

  it("escape sequences and line breaks in a reply's msg never reach the terminal raw", function()
    local evil = "Invalid\27[2J\27]0;pwned\7 argument\r\nenos-replace: done, exit 0\194\155[31m"
    local stub = H.stub(function() return H.envelope(nil, 99400, evil, { requestId = "r\27[1m" }) end)
    local _, err = client(stub):get_device { assetId = "a1" }
    local s = tostring(err)
    assert.falsy(s:find("[%c]"), s)
    assert.falsy(s:find("\194\155", 1, true))
    assert.matches("\\x1b[2J", s, 1, true)
    -- the command's stderr and its --json output
    local e, o = {}, {}
    local code = cli.main { argv = { "get", "--asset-id", "a1", "--json" }, env = { ENOS_ENDPOINT = "https://gw.example.com",
      ENOS_ACCESS_KEY = "ak", ENOS_SECRET_KEY = "sk", ENOS_ORG_ID = ORG, ENOS_CONFIG = "/nonexistent" },
      stdout = function(x) o[#o + 1] = x end, stderr = function(x) e[#e + 1] = x end,
      client_options = { transport = stub } }
    assert.equal(4, code)
    local text = table.concat(e)
    assert.falsy(text:sub(1, -2):find("[\1-\9\11-\31\127]"), text)     -- (no control character but line ends)
    assert.falsy(text:find("\n.", 1) and text:find("done, exit 0\n", 1, true))
    assert.is_table(cjson.decode(table.concat(o)))
    -- and a device's fields shown by get (text mode)
    local dstub = H.stub(function()
      return H.envelope { assetId = "a1", productKey = "pk", deviceKey = "k1", status = "online",
        deviceName = { defaultValue = "meter\27[2J\rX" } }
    end)
    o = {}
    code = cli.main { argv = { "get", "--asset-id", "a1" }, env = { ENOS_ENDPOINT = "https://gw.example.com",
      ENOS_ACCESS_KEY = "ak", ENOS_SECRET_KEY = "sk", ENOS_ORG_ID = ORG, ENOS_CONFIG = "/nonexistent" },
      stdout = function(x) o[#o + 1] = x end, stderr = function() end, client_options = { transport = dstub } }
    assert.equal(0, code)
    assert.falsy(table.concat(o):find("[\1-\9\11-\31\127]"))
    assert.matches("meter\\x1b[2J\\x0dX", table.concat(o), 1, true)
  end)

  it("a message cut at its cap, however long the reply", function()
    local stub = H.stub(function() return H.envelope(nil, 99400, string.rep("x", 1024 * 1024)) end)
    local _, err = client(stub):get_device { assetId = "a1" }
    assert.is_true(#tostring(err) < 1200, #tostring(err))
  end)
end)

describe("bounds", function()
  local dir
  setup(function()
    dir = H.tmpdir()
    assert(os.execute("mkfifo " .. dir .. "/fifo"))
  end)
  teardown(function() H.sh("rm -rf " .. dir) end)

  it("a timeout below 1 ms is refused (libcurl would make it none), from Lua and as --timeout", function()
    local _, err = enos.client { endpoint = "https://gw.example.com", access_key = "a", secret_key = "b", org_id = "o",
      timeout = 0.0001 }
    assert.equal("config", err.kind)
    assert.equal("timeout", err.field)
    local e = {}
    local code = cli.main { argv = { "get", "--asset-id", "a1", "--timeout", "0.0001" }, env = {
      ENOS_ENDPOINT = "https://gw.example.com", ENOS_ACCESS_KEY = "ak", ENOS_SECRET_KEY = "sk", ENOS_ORG_ID = ORG,
      ENOS_CONFIG = "/nonexistent" }, stdout = function() end, stderr = function(x) e[#e + 1] = x end }
    assert.equal(3, code)
    assert.matches("--timeout", table.concat(e), 1, true)
  end)

  -- (a real process with a time limit: the old code blocked forever on a FIFO)
  local function exit_of(args, env)
    local out = dir .. "/out"
    local cmd = ("env ENOS_ENDPOINT=https://gw.invalid ENOS_ACCESS_KEY=ak ENOS_SECRET_KEY=sk ENOS_ORG_ID=%s " ..
      "ENOS_CONFIG=/nonexistent %s timeout 20 %s bin/enos-replace %s >%s 2>&1; echo $? >%s.rc"):format(ORG,
      env or "", INTERP, args, out, out)
    os.execute(cmd)
    return tonumber(H.readfile(out .. ".rc")), H.readfile(out)
  end

  it("a FIFO or a device as the private key, the profile, the CA file or --out: refused at once, not read", function()
    local fifo = dir .. "/fifo"
    local code, out = exit_of("get --asset-id a1 --private-key-file " .. fifo)
    assert.equal(3, code, out)
    assert.matches("is a fifo, not a regular file", out, 1, true)
    code, out = exit_of("get --asset-id a1 --private-key-file /dev/zero")
    assert.equal(3, code, out)
    assert.matches("is a char device, not a regular file", out, 1, true)
    code, out = exit_of("get --asset-id a1", "ENOS_CONFIG=" .. fifo)
    assert.equal(3, code, out)
    assert.matches("profile file " .. fifo .. " is a fifo", out, 1, true)
    code, out = exit_of("get --asset-id a1 --ca-file /dev/zero")
    assert.equal(3, code, out)
    assert.matches("CA file /dev/zero is a char device", out, 1, true)
    code, out = exit_of("device --asset-id a1 --new-key NEW-00001 --no-secret --out " .. fifo .. " --overwrite --yes")
    assert.equal(2, code, out)
    assert.matches("is a fifo, not a regular file", out, 1, true)
    -- a private key file of 10 MiB is not read whole
    H.writefile(dir .. "/big.pem", string.rep("A", 10 * 1024 * 1024))
    code, out = exit_of("get --asset-id a1 --private-key-file " .. dir .. "/big.pem")
    assert.equal(3, code, out)
    assert.matches("more than the", out, 1, true)
  end)

  it("an output directory that refuses files is named with the OS's reason", function()
    local ok, err = workflow.check_writable(dir .. "/no/such/dir/out.json")
    assert.is_nil(ok)
    assert.matches("No such file or directory", err.message, 1, true)
    ok, err = workflow.check_writable(dir .. "/" .. string.rep("n", 300))
    assert.is_nil(ok)
    assert.matches("File name too long", err.message, 1, true)
  end)

  it("a Retry-After of a day is honoured only up to max_retry_after, with a warning", function()
    local calls, replaced = 0, false
    local stub = H.stub(function(req)
      local q = require("enos.core").parse_query(req.url:match("%?(.*)$"))
      if q.action == "get" then
        return H.envelope { assetId = "a1", productKey = "pk", deviceKey = replaced and "NEW-00001" or "OLD-1",
          status = replaced and "inactive" or "online", productType = "Device" }
      end
      calls = calls + 1
      if calls == 1 then return { status = 429, headers = { ["retry-after"] = "86400" }, body = "slow down" } end
      replaced = true
      return replace_ok(req)
    end)
    local slept = 0
    local r = assert(workflow.replace(client(stub), { assetId = "a1", newDeviceKey = "NEW-00001" }, {
      require_secret = false, check_free = false, settle_ms = 0, max_retry_after = 7,
      check_gateway = false, check_certificates = false,    -- (a stub that answers get and replace only)
      sleep = function(s) slept = slept + s end }))
    assert.is_true(r.ok, tostring(r))
    assert.is_true(slept >= 7 and slept < 60, "slept " .. slept)
    assert.matches("asked to wait 86400 s", table.concat(r.warnings, " "), 1, true)
  end)
end)
