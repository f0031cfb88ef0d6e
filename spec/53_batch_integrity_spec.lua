-- The batch against the simulator, where the platform or another operator does not play along: a private key
-- that does not match (stopped before anything is written or changed, proven with one call for the whole
-- batch), a device whose key another operator changed between the preflight and the replace (compare-and-swap:
-- the row ends conflict, the other operator's change stands), and a replace whose reply carries no usable
-- secret (the row is not done until a resume has the secret in hand).
local enos = require "enos"
local batch = require "enos.batch"
local workflow = require "enos.workflow"
local cjson = require "cjson"
local H = require "helpers"
local sim = dofile("spec/sim_helper.lua")

local ORG = "o15724268424841"

local function seed(n)
  local devices = {}
  for i = 1, n do
    devices[i] = { productKey = "pk_demo", deviceKey = ("OLD-%05d"):format(i), assetId = ("A%07d"):format(i) }
  end
  return devices
end

local function plan_of(dir, name, from, to)
  local path = dir .. "/" .. name .. ".csv"
  local lines = { "assetId,newDeviceKey" }
  for i = from, to do lines[#lines + 1] = ("A%07d,NEW-%05d"):format(i, i) end
  H.writefile(path, table.concat(lines, "\n") .. "\n")
  return path
end

local function count_ops(h, since, pred)
  local n = 0
  for _, e in ipairs(h:log(since)) do if pred(e) then n = n + 1 end end
  return n
end

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() return true end
  return false
end

describe("batch integrity against the simulator", function()
  local h, kp, other, dir
  setup(function()
    kp = H.keypair()
    other = H.keypair(1024)          -- another application's key pair
    h = sim.start { config = {
      apps = { { access_key = "ak", secret_key = "sk", public_key_file = kp.public_file } },
      devices = seed(40) } }
    dir = H.tmpdir()
  end)
  teardown(function()
    if h then h:stop() end
    if dir then H.sh("rm -rf " .. dir) end
  end)

  local function client(extra)
    local o = { endpoint = h.url, access_key = "ak", secret_key = "sk", org_id = ORG,
      private_key_file = kp.private_file, timeout = 5 }
    for k, v in pairs(extra or {}) do o[k] = v end
    return assert(enos.client(o))
  end

  it("a private key that does not match stops the batch before anything is written or replaced", function()
    local plan = plan_of(dir, "wrongkey", 1, 5)
    local since = #h:log()
    local s, err = batch.run(client { private_key_file = other.private_file }, plan,
      { journal = dir .. "/wrongkey.journal", out = dir .. "/wrongkey.creds.csv" })
    assert.is_nil(s)
    assert.equal("config", err.kind)
    assert.matches("private key does not decrypt", err.message, 1, true)
    assert.equal(0, count_ops(h, since, function(e) return e.op == "replaceDevice" end))
    assert.equal(1, count_ops(h, since, function(e) return e.op == "get" end))
    assert.is_false(exists(dir .. "/wrongkey.journal"), "a refused start left a journal behind")
    assert.is_false(exists(dir .. "/wrongkey.creds.csv"))
    for i = 1, 5 do assert.equal(("OLD-%05d"):format(i), h:device(("A%07d"):format(i)).deviceKey) end
    -- the corrected command then runs
    local ok = assert(batch.run(client(), plan, { journal = dir .. "/wrongkey.journal", out = dir .. "/wrongkey.creds.csv",
      settle_ms = 10 }))
    assert.equal(5, ok.done)
    assert.equal("proven", ok.key_proof)
  end)

  it("proves the key with one read for the whole batch, not one per row", function()
    local plan = plan_of(dir, "onecall", 6, 15)
    local since = #h:log()
    local s = assert(batch.run(client(), plan, { journal = dir .. "/onecall.journal", out = dir .. "/onecall.creds.csv",
      settle_ms = 10 }))
    assert.equal(10, s.done)
    local secret_reads = count_ops(h, since, function(e)
      return e.op == "get" and (e.query or ""):find("requireSecret=true", 1, true) ~= nil
    end)
    assert.equal(1, secret_reads)
  end)

  it("a device whose key another operator changed after the preflight ends conflict; the change stands", function()
    local plan = plan_of(dir, "cas", 16, 18)
    local inner = require("enos.core").easy { timeout = 5 }
    local rival = client()
    local raced = false
    local t = { send = function(_, req)
      if not raced and req.url:find("action=replaceDevice", 1, true) and req.url:find("OLD-00017", 1, true) then
        raced = true     -- between this row's preflight and its replace, another operator swaps the unit
        assert(rival:replace_device { assetId = "A0000017", newDeviceKey = "RIVAL-00017" })
      end
      return inner:send(req)
    end }
    local s = assert(batch.run(client { transport = t }, plan, { journal = dir .. "/cas.journal",
      out = dir .. "/cas.creds.csv", settle_ms = 10, concurrency = 1 }))
    assert.is_true(raced)
    assert.equal(2, s.done)
    assert.equal(1, s.failed)
    assert.equal(1, s.failed_by_kind.conflict)
    assert.equal("RIVAL-00017", h:device("A0000017").deviceKey)       -- not overwritten by the batch
    local res = H.readfile(dir .. "/cas.results.csv")
    assert.matches("A0000017,NEW%-00017,A0000017,failed,conflict,[^\n]*RIVAL%-00017", res)
    assert.falsy(H.readfile(dir .. "/cas.creds.csv"):find("A0000017", 1, true), "credentials for a device we did not replace")
  end)

  -- The key the preflight read moves to ANOTHER asset before the replace (the row's device renamed away, another
  -- device given its key): the compare-and-swap by productKey + deviceKey then replaces that other asset.
  -- It must be said loudly (never "nothing was changed"), never counted done, and its new secret kept.
  local function swap_keys(rival, a, tmp, b, key)
    assert(rival:replace_device { assetId = a, newDeviceKey = tmp })
    assert(rival:replace_device { assetId = b, newDeviceKey = key })
  end

  it("workflow: the replace landing on another asset is WRONG DEVICE, that asset's credentials kept", function()
    local rival = client()
    local out = dir .. "/wrong.json"
    local report, err = workflow.replace(client(), { productKey = "pk_demo", deviceKey = "OLD-00026",
      newDeviceKey = "NEW-00026" }, { out = out, settle_ms = 10, sleep = function() end,
      before_replace = function() swap_keys(rival, "A0000026", "TMP-00026", "A0000027", "OLD-00026") end })
    assert.is_nil(report)
    assert.equal("conflict", err.kind)
    assert.equal("A0000027", err.wrong_device)
    assert.truthy(err.message:find("WRONG DEVICE", 1, true))
    assert.equal("wrong_device", err.report.outcome)
    assert.equal("NEW-00026", h:device("A0000027").deviceKey)       -- what the platform did
    assert.equal("TMP-00026", h:device("A0000026").deviceKey)
    local rec = cjson.decode(H.readfile(out))
    assert.equal("A0000027", rec.assetId)
    assert.equal("wrong_device", rec.outcome)
    assert.equal(h:device("A0000027").deviceSecret, rec.deviceSecret)
    assert.equal(5, require("enos.cli").exit_code(err))
  end)

  it("batch: a row whose replace lands on another asset is not done; that asset's secret is in the credentials", function()
    local plan = dir .. "/wrong.csv"
    H.writefile(plan, "productKey,deviceKey,newDeviceKey\npk_demo,OLD-00023,NEW-00023\npk_demo,OLD-00025,NEW-00025\n")
    local inner = require("enos.core").easy { timeout = 5 }
    local rival = client()
    local raced = false
    local t = { send = function(_, req)
      if not raced and req.call == "replace_device" and req.url:find("OLD-00023", 1, true) then
        raced = true
        swap_keys(rival, "A0000023", "TMP-00023", "A0000024", "OLD-00023")
      end
      return inner:send(req)
    end }
    local s = assert(batch.run(client { transport = t }, plan, { journal = dir .. "/wrong.journal",
      out = dir .. "/wrong.creds.csv", settle_ms = 10, concurrency = 1 }))
    assert.is_true(raced)
    assert.equal(1, s.done)
    assert.equal(1, s.failed)
    local res = H.readfile(dir .. "/wrong.results.csv")
    assert.matches("pk_demo/OLD%-00023,NEW%-00023,A0000024,wrong_device,conflict,[^\n]*WRONG DEVICE", res)
    local creds = H.readfile(dir .. "/wrong.creds.csv")
    assert.truthy(creds:find("A0000024,pk_demo,NEW-00023," .. h:device("A0000024").deviceSecret .. ",,,wrong_device",
      1, true), creds)
    local failed
    for line in io.lines(dir .. "/wrong.journal") do
      local r = cjson.decode(line)
      if r.state == "failed" then failed = r end
    end
    assert.equal("A0000024", failed.wrong_device)
    assert.equal("A0000023", failed.assetId)
    assert.is_string(failed.encrypted.deviceSecret)
  end)

  -- The CLI, in process, with a transport that rewrites the platform's replies.
  local function cli_run(argv, t)
    local out, err = {}, {}
    local code = require("enos.cli").main {
      argv = argv, env = { ENOS_ENDPOINT = h.url, ENOS_ACCESS_KEY = "ak", ENOS_SECRET_KEY = "sk", ENOS_ORG_ID = ORG,
        ENOS_PRIVATE_KEY_FILE = kp.private_file, ENOS_CONFIG = dir .. "/no-profile" },
      stdout = function(x) out[#out + 1] = x end, stderr = function(x) err[#err + 1] = x end,
      sleep = function() end, client_options = t and { transport = t } or nil,
    }
    return code, table.concat(out), table.concat(err)
  end
  local function rewriting(fn)
    local inner = require("enos.core").easy { timeout = 5 }
    return { send = function(_, req)
      local res, err = inner:send(req)
      if res and res.status == 200 then
        local doc = cjson.decode(res.body)
        if type(doc) == "table" and type(doc.data) == "table" then
          fn(req, doc.data)
          res.body = cjson.encode(doc)
        end
      end
      return res, err
    end }
  end

  it("device: a secret that is never in hand exits 6 (not 0 with a warning), the encrypted pair in --out", function()
    local t = rewriting(function(req, d)
      -- after the replace, every secret this device gets is one that does not decrypt
      if req.url:find("replaceDevice", 1, true) or (req.url:find("NEW-00030", 1, true) == nil and d.deviceKey == "NEW-00030") then
        d.deviceSecret, d.sessionKey = "AAAA", "BBBB"
      end
    end)
    local code, out, err = cli_run({ "device", "--asset-id", "A0000030", "--new-key", "NEW-00030", "--out",
      dir .. "/dev30.json", "--yes" }, t)
    assert.equal(6, code, err)
    assert.equal("NEW-00030", h:device("A0000030").deviceKey)
    assert.matches("not in hand", err, 1, true)
    local rec = cjson.decode(H.readfile(dir .. "/dev30.json"))
    assert.is_nil(rec.deviceSecret)
    assert.equal("AAAA", rec.encrypted.deviceSecret)
    assert.falsy((out .. err):find(h:device("A0000030").deviceSecret, 1, true))
  end)

  it("get --secret: a reply about another device writes nothing (exit 5); a secret not in hand exits 6", function()
    local code, _, err = cli_run({ "get", "--asset-id", "A0000031", "--secret", "--out", dir .. "/get31.json" },
      rewriting(function(_, d) d.assetId = "A0000032" end))
    assert.equal(5, code, err)
    assert.matches("another device", err, 1, true)
    assert.is_false(exists(dir .. "/get31.json"))
    code, _, err = cli_run({ "get", "--asset-id", "A0000031", "--secret", "--out", dir .. "/get31.json" },
      rewriting(function(_, d) d.deviceSecret, d.sessionKey = nil, nil end))
    assert.equal(6, code, err)
    assert.matches("not in hand", err, 1, true)
    -- and with an honest platform: exit 0, the secret in the file
    code, _, err = cli_run({ "get", "--asset-id", "A0000031", "--secret", "--out", dir .. "/get31b.json" })
    assert.equal(0, code, err)
    assert.equal(h:device("A0000031").deviceSecret, cjson.decode(H.readfile(dir .. "/get31b.json")).deviceSecret)
  end)

  it("a Retry-After of a day pauses the batch only max_retry_after seconds, and says so", function()
    local plan = plan_of(dir, "retryafter", 34, 35)
    assert.equal(200, (h:admin("POST", "/faults", { rate_limit = { status = 429, retry_after = 86400, every = 1 },
      count = 1, match = "replaceDevice" })))
    local paused = 0
    local s = assert(batch.run(client(), plan, { journal = dir .. "/ra.journal", settle_ms = 10, concurrency = 1,
      max_retry_after = 1, progress = function(p) paused = math.max(paused, p.paused or 0) end }))
    h:admin("DELETE", "/faults")
    assert.equal(2, s.done)
    assert.is_true(paused > 0 and paused <= 1, "paused " .. paused)
    assert.matches("asked to wait 86400 s", table.concat(s.warnings, " "), 1, true)
  end)

  it("a replace reply with an empty secret is not done: not counted, not in the credentials, recovered on resume", function()
    local plan = plan_of(dir, "empty", 20, 22)
    local inner = require("enos.core").easy { timeout = 5 }
    local hostile = true
    local t = { send = function(_, req)
      local res, err = inner:send(req)
      local mine = req.url:find("00021", 1, true)
      if hostile and mine and res and res.status == 200 then
        if req.url:find("action=replaceDevice", 1, true) then
          local doc = cjson.decode(res.body)
          doc.data.deviceSecret, doc.data.sessionKey = "", ""
          res.body = cjson.encode(doc)
        elseif req.url:find("requireSecret=true", 1, true) then
          local doc = cjson.decode(res.body)
          if doc.data then doc.data.deviceSecret, doc.data.sessionKey = nil, nil end
          res.body = cjson.encode(doc)
        end
      end
      return res, err
    end }
    local c = client { transport = t }
    local journal, out = dir .. "/empty.journal", dir .. "/empty.creds.csv"
    local s = assert(batch.run(c, plan, { journal = journal, out = out, settle_ms = 10, read_attempts = 2 }))
    assert.equal(2, s.done)
    assert.equal(1, s.failed)
    assert.equal("NEW-00021", h:device("A0000021").deviceKey)           -- the replace did happen
    assert.falsy(H.readfile(out):find("A0000021", 1, true), "a credentials line without its secret")
    assert.matches("A0000021,NEW%-00021,A0000021,unknown,decrypt", H.readfile(dir .. "/empty.results.csv"))
    -- a resume with an honest platform reads the secret back; a second resume has nothing left to do
    hostile = false
    local r = assert(batch.run(c, plan, { journal = journal, out = out, resume = true, settle_ms = 10 }))
    assert.equal(1, r.reconciled)
    assert.equal(0, r.failed)
    local found
    for line in io.lines(out) do
      local cells = require("enos.plan").split_csv(line)
      if cells[2] == "A0000021" then found = cells end
    end
    assert.is_table(found)
    assert.equal(h:device("A0000021").deviceSecret, found[5])
    local again = assert(batch.run(c, plan, { journal = journal, out = out, resume = true, settle_ms = 10 }))
    assert.equal(0, again.done)
    assert.equal(3, again.skipped)
  end)
end)
