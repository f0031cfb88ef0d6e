-- Fleet-scale batch: plan checks, faults, journal, crash and resume.
local enos = require "enos"
local batch = require "enos.batch"
local core = require "enos.core"
local cjson = require "cjson"
local H = require "helpers"
local sim = dofile("spec/sim_helper.lua")

local ORG = "o15724268424841"
local FLAVOUR = type(jit) == "table" and "luajit" or "lua5.4"

local function seed(n)
  local devices = {}
  for i = 1, n do
    devices[i] = { productKey = "pk_demo", deviceKey = ("OLD-%05d"):format(i), assetId = ("A%07d"):format(i) }
  end
  return devices
end

local function write_plan(path, n, form)
  local f = assert(io.open(path, "w"))
  if form == "jsonl" then
    for i = 1, n do
      f:write(cjson.encode { assetId = ("A%07d"):format(i), newDeviceKey = ("NEW-%05d"):format(i), site = "s" .. i }, "\n")
    end
  else
    f:write("productKey,deviceKey,newDeviceKey,site\n")
    for i = 1, n do f:write(("pk_demo,OLD-%05d,NEW-%05d,\"Site %d, North\"\n"):format(i, i, i)) end
  end
  f:close()
end

-- Every row done exactly once, every secret in the credentials file the one the simulator holds.
local function assert_all_done(h, n, creds_path, journal_path)
  local _, list = h:admin("GET", "/devices")
  local by_asset = {}
  for _, d in ipairs(list.data) do by_asset[d.assetId] = d end
  local creds = {}
  local f = assert(io.open(creds_path))
  local header = f:read("*l")
  assert.equal("line,assetId,productKey,deviceKey,deviceSecret,encryptedSecret,sessionKey,outcome,site", header)
  for line in f:lines() do
    local cells = require("enos.plan").split_csv(line)
    assert.is_nil(creds[cells[2]], "asset " .. cells[2] .. " written twice")
    creds[cells[2]] = { deviceKey = cells[4], secret = cells[5], site = cells[9] }
  end
  f:close()
  local journal = H.readfile(journal_path)
  for i = 1, n do
    local asset = ("A%07d"):format(i)
    local d = by_asset[asset]
    assert.equal(("NEW-%05d"):format(i), d.deviceKey)
    assert.equal("inactive", d.status)
    assert.is_table(creds[asset], "no credentials for " .. asset)
    assert.equal(d.deviceKey, creds[asset].deviceKey)
    assert.equal(d.deviceSecret, creds[asset].secret)
    assert.equal(("Site %d, North"):format(i), creds[asset].site)     -- extra columns carried through
    assert.falsy(journal:find(d.deviceSecret, 1, true), "plaintext secret in the journal")
  end
  -- exactly once: one applied replace per asset (an ambiguous drop was applied too)
  local applied = {}
  for _, e in ipairs(h:log()) do
    if e.op == "replaceDevice" and (e.code == 0 or e.fault == "ambiguous") then
      local q = require("enos.core").parse_query(e.query or "") or {}
      local who = q.assetId or q.deviceKey
      applied[who] = (applied[who] or 0) + 1
    end
  end
  for who, count in pairs(applied) do assert.equal(1, count, who .. " replaced " .. count .. " times") end
end

describe("batch plan check", function()
  local h, dir
  setup(function()
    h = sim.start { config = { devices = seed(5) } }
    dir = H.tmpdir()
  end)
  teardown(function() if h then h:stop() end end)

  local bad = {
    { "missing column", "productKey,deviceKey\npk_demo,OLD-00001\n", 1, "header" },
    { "bad new key", "assetId,newDeviceKey\nA0000001,NEW-00001\nA0000002,bad key!\n", 3, "newDeviceKey" },
    { "duplicate target", "assetId,newDeviceKey\nA0000001,NEW-00001\nA0000001,NEW-00002\n", 3, "same device as line 2" },
    { "duplicate new key", "assetId,newDeviceKey\nA0000001,NEW-00001\nA0000002,NEW-00001\n", 3, "also the new key of line 2" },
    { "duplicate new key in one product", "productKey,deviceKey,newDeviceKey\npk_demo,OLD-00001,NEW-00001\n" ..
      "pk_other,OLD-00001,NEW-00007\npk_demo,OLD-00002,NEW-00001\n", 4, "also the new key of line 2" },
    { "a new key by assetId that a product's row takes too", "assetId,productKey,deviceKey,newDeviceKey\n" ..
      "A0000001,,,NEW-00001\n,pk_other,OLD-00001,NEW-00001\n", 3, "also the new key of line 2" },
    { "chained rename by asset and key", "assetId,productKey,deviceKey,newDeviceKey\nA0000001,,,NEW-00001\n" ..
      ",pk_demo,NEW-00001,NEW-00009\n", 3, "chained" },
    { "new equals old", "productKey,deviceKey,newDeviceKey\npk_demo,OLD-00001,OLD-00001\n", 2, "equals the current" },
    { "chained rename", "productKey,deviceKey,newDeviceKey\npk_demo,OLD-00001,NEW-00001\npk_demo,NEW-00001,NEW-00009\n", 3,
      "chained" },
    { "both identifiers", "assetId,productKey,deviceKey,newDeviceKey\nA0000001,pk_demo,OLD-00001,NEW-00001\n", 2, "either" },
    { "unterminated quote", "assetId,newDeviceKey,note\nA0000001,NEW-00001,\"open\n", 2, "unterminated" },
    { "wrong field count", "assetId,newDeviceKey\nA0000001,NEW-00001,extra\n", 2, "has 3 fields" },
    { "control character", "assetId,newDeviceKey\nA00\0011,NEW-00001\n", 2, "control" },
    { "empty plan", "assetId,newDeviceKey\n", 0, "no rows" },
  }
  for _, case in ipairs(bad) do
    it("catches " .. case[1] .. " with its line number and sends nothing", function()
      local path = dir .. "/bad.csv"
      H.writefile(path, case[2])
      local c = assert(enos.client { endpoint = h.url, access_key = "sim-access-key", secret_key = "sim-secret-key",
        org_id = ORG })
      local before = #h:log()
      local s, err = batch.run(c, path, { journal = dir .. "/j-" .. case[1]:gsub(" ", "_") })
      assert.is_nil(s)
      assert.equal("invalid_argument", err.kind)
      local found = false
      for _, e in ipairs(err.check.errors) do
        if e.line == case[3] and e.message:find(case[4], 1, true) then found = true end
      end
      assert.is_true(found, "expected line " .. case[3] .. ": " .. case[4] .. "; got " .. cjson.encode(err.check.errors))
      assert.equal(before, #h:log())
    end)
  end

  it("check accepts one new key in two products (keys are unique per product)", function()
    local path = dir .. "/two_products.csv"
    H.writefile(path, "productKey,deviceKey,newDeviceKey\npk_demo,DEV-A-1,SHARED-1\npk_other,DEV-A-1,SHARED-1\n" ..
      "pk_other,SHARED-1X,SHARED-2\npk_demo,DEV-A-2,SHARED-1X\n")
    local res = assert(batch.check(path))
    assert.equal(4, res.rows)
    assert.same({}, res.errors)
  end)

  it("check on a JSONL plan reports a line that is not an object", function()
    local path = dir .. "/bad.jsonl"
    H.writefile(path, '{"assetId":"A0000001","newDeviceKey":"NEW-00001"}\n[1,2]\n')
    local res = batch.check(path)
    assert.equal(1, res.error_count)
    assert.equal(2, res.errors[1].line)
  end)
end)

describe("batch against the simulator", function()
  local h, kp, dir
  local N = 500
  setup(function()
    kp = H.keypair()
    h = sim.start { workers = 2, config = {
      log_size = 20000,
      apps = { { access_key = "ak", secret_key = "sk", public_key_file = kp.public_file } },
      devices = seed(N) } }
    dir = H.tmpdir()
  end)
  teardown(function() if h then h:stop() end end)
  before_each(function() h:admin("POST", "/reset") end)

  local function client()
    return assert(enos.client { endpoint = h.url, access_key = "ak", secret_key = "sk", org_id = ORG,
      private_key_file = kp.private_file, timeout = 5 })
  end

  it("a 500-row plan under 429 storms, 5xx, drops and ambiguous drops ends with every row done once", function()
    local plan = dir .. "/plan500.csv"
    write_plan(plan, N)
    h:admin("POST", "/faults", { rate_limit = { status = 429, retry_after = 0, share = 0.15 },
      error_share = 0.05, error_status = 503, drop_share = 0.03, ambiguous_share = 0.05 })
    local c = client()
    local progress = 0
    local s = assert(batch.run(c, plan, { concurrency = 16, journal = dir .. "/j500", out = dir .. "/creds500.csv",
      settle_ms = 50, backoff_ms = 20, progress = function() progress = progress + 1 end }))
    h:admin("DELETE", "/faults")
    assert.equal(N, s.total)
    local fails = {}
    for line in io.lines(dir .. "/j500.results.csv") do
      if line:find(",failed,", 1, true) or line:find(",unknown,", 1, true) then fails[#fails + 1] = line end
    end
    assert.equal(0, s.failed, table.concat(fails, "\n"))
    assert.equal(N, s.done)
    assert.is_true(s.retries > 0)
    assert.is_true(s.reconciled > 0)
    assert.is_true(progress > 0)
    assert_all_done(h, N, dir .. "/creds500.csv", dir .. "/j500")
    local mode = H.sh("stat -c %a " .. dir .. "/creds500.csv"):gsub("%s+", "")
    assert.equal("600", mode)
    assert.equal("600", (H.sh("stat -c %a " .. dir .. "/j500"):gsub("%s+", "")))
    -- a second run without --resume refuses to reuse the journal
    local again, err = batch.run(c, plan, { journal = dir .. "/j500" })
    assert.is_nil(again)
    assert.matches("resume", err.message)
  end)

  it("a read that loses four connections in a row is retried (read_attempts, default 8), not failed", function()
    local plan = dir .. "/drops.csv"
    H.writefile(plan, "assetId,newDeviceKey\nA0000031,NEW-00031\n")
    h:admin("POST", "/faults", { drop_share = 1, match = { "get", "search" }, count = 4 })
    -- (no secret asked: the batch's one read that proves the private key would take a drop of its own)
    local _, since = h:log()
    local s = assert(batch.run(client(), plan, { concurrency = 1, journal = dir .. "/jdrops", out = dir .. "/cdrops.csv",
      settle_ms = 10, backoff_ms = 5, require_secret = false }))
    h:admin("DELETE", "/faults")
    local dropped = 0
    for _, e in ipairs(h:log(since)) do
      if (e.op == "get" or e.op == "search") and e.status == 444 then dropped = dropped + 1 end
    end
    assert.equal(4, dropped)
    assert.equal(0, s.failed, H.readfile(dir .. "/jdrops.results.csv"))
    assert.equal(1, s.done)
    assert.equal("NEW-00031", h:device("A0000031").deviceKey)
    -- with the workflow's own 3 read attempts, the same drops fail the row (and change nothing)
    -- (reads that keep failing: the batch's bulk read gives up after 3, then the row's own read after 3 more)
    H.writefile(plan, "assetId,newDeviceKey\nA0000032,NEW-00032\n")
    _, since = h:log()
    h:admin("POST", "/faults", { drop_share = 1, match = { "get", "search" } })
    s = assert(batch.run(client(), plan, { concurrency = 1, journal = dir .. "/jdrops3", settle_ms = 10, backoff_ms = 5,
      read_attempts = 3, require_secret = false }))
    h:admin("DELETE", "/faults")
    assert.equal(1, s.failed)
    assert.equal(1, s.failed_by_kind.transport)
    assert.equal("OLD-00032", h:device("A0000032").deviceKey)
    local gets = 0
    for _, e in ipairs(h:log(since)) do if e.op == "get" then gets = gets + 1 end end
    assert.is_true(gets >= 3 and gets <= 4, gets .. " gets")     -- (libcurl may re-send once on a dead connection)
  end)

  -- Wraps core.multi for one batch: tracks the journal bytes known durable (a worker fsync completed;
  -- the size at its submission) and calls on_add(req, durable_bytes) for each request handed over.
  -- hold_ms: the first fsync's completion is reported that long after its submission (a slow disk).
  local function watch_multi(journal, on_add, hold_ms)
    local real_multi, w, at_submit, submitted, held = core.multi, { durable_bytes = 0 }, {}, {}, nil
    core.multi = function(...)
      local m = real_multi(...)
      return setmetatable({
        add = function(_, req)
          if on_add then on_add(req, w.durable_bytes) end
          return m:add(req)
        end,
        fsync = function(_, file)
          local id = m:fsync(file)
          submitted[id] = core.now_ms()
          local f = io.open(journal, "rb")
          at_submit[id] = f and f:seek("end") or 0
          if f then f:close() end
          return id
        end,
        wait = function(_, t)
          if held then t = math.min(t, math.max(0, (held.at - core.now_ms()) / 1000)) end
          local list = m:wait(t)
          for i, d in ipairs(list) do
            if hold_ms and not w.held and at_submit[d.id] then
              held, w.held = { d = d, at = submitted[d.id] + hold_ms }, true
              table.remove(list, i)
              break
            end
          end
          if held and core.now_ms() >= held.at then list[#list + 1], held = held.d, nil end
          for _, d in ipairs(list) do
            if at_submit[d.id] and d.res then w.durable_bytes = math.max(w.durable_bytes, at_submit[d.id]) end
          end
          return list
        end,
      }, { __index = function(_, k) return function(_, ...) return m[k](m, ...) end end })
    end
    w.restore = function() core.multi = real_multi end
    return w
  end

  it("a row counts as done only once its journal record is fsynced (the worker's group commit)", function()
    local plan, journal = dir .. "/plan_sync.csv", dir .. "/j_sync"
    write_plan(plan, 300)
    local w = watch_multi(journal)
    local ahead, seen = {}, 0
    local ok, s = pcall(batch.run, client(), plan, { concurrency = 4, journal = journal, commit_ms = 20,
      progress = function(p)
        if p.final then return end        -- (after the batch's closing fsync, not the worker's)
        seen = seen + 1
        local durable = H.readfile(journal):sub(1, w.durable_bytes)
        local n = select(2, durable:gsub('"state":"done"', ""))
        if p.done > n then ahead[#ahead + 1] = p.done .. " counted, " .. n .. " durable" end
      end })
    w.restore()
    assert(ok, s)
    assert(s, "batch failed")
    assert.equal(300, s.done)
    assert.is_true(seen > 0)
    assert.same({}, ahead)
    assert.equal(300, select(2, H.readfile(journal):gsub('"state":"done"', "")))
  end)

  -- every replace handed to libcurl must find a durable "sending" record of its row at most settle/2 old
  local function watch_sending(journal, settle, hold_ms)
    local v = { bad = {}, replaces = 0, early = 0 }
    v.w = watch_multi(journal, function(req, durable_bytes)
      if not (req.once and req.url:find("action=replaceDevice", 1, true)) then return end
      v.replaces = v.replaces + 1
      local key = req.url:match("deviceKey=([^&]+)") or req.url:match("assetId=([^&]+)")
      local now, best, nrec = core.now_ms(), nil, 0
      for line in H.readfile(journal):sub(1, durable_bytes):gmatch("[^\n]+") do
        local r = cjson.decode(line)
        if r.state == "sending" and (line:find(key, 1, true) or (r.assetId and r.assetId == key)) then
          best, nrec = r, nrec + 1
        end
      end
      if not best then v.bad[#v.bad + 1] = "no durable sending record for " .. key
      elseif now - best.ts > settle / 2 + 5 then v.bad[#v.bad + 1] = ("%s: record %d ms old"):format(key, now - best.ts)
      elseif nrec == 1 then v.early = v.early + 1 end      -- the one written when the row started
    end, hold_ms)
    return v
  end

  -- Runs a plan of `rows` rows with watch_sending on, under a simulator fault (if any); returns summary, watch.
  local function run_watched(name, rows, settle, opts, fault, hold_ms)
    local plan, journal = dir .. "/plan_" .. name .. ".csv", dir .. "/j_" .. name
    write_plan(plan, rows)
    if fault then h:admin("POST", "/faults", fault) end
    local v = watch_sending(journal, settle, hold_ms)
    opts.journal, opts.settle_ms = journal, settle
    local ok, s = pcall(batch.run, client(), plan, opts)
    v.w.restore()
    if fault then h:admin("DELETE", "/faults") end
    assert(ok, s)
    assert(s, "batch failed")
    assert.equal(rows, s.done)
    assert.same({}, v.bad)
    return s, v
  end

  it("a replace leaves only once a durable 'sending' record of its row, at most settle/2 old, is in the journal",
    function()
    local _, v = run_watched("send", 200, 2000, { concurrency = 16 })
    assert.equal(200, v.replaces)
    assert.is_true(v.early > 0)        -- most replaces went out on the record written at the row's start
  end)

  it("a 'sending' record that ages past settle/2 while its fsync is awaited is written afresh before the replace",
    function()
    -- the row's first record: written at the row's start, checked after a 50 ms preflight (50 ms old: fine),
    -- durable only at 150 ms (a slow disk): by then older than settle/2 (100 ms), so it cannot be the one
    local _, v = run_watched("slowsync", 1, 200, { concurrency = 1 }, { latency_ms = 50, match = "get" }, 150)
    assert.is_true(v.w.held)
    assert.equal(1, v.replaces)
  end)

  it("a replace retried after a 429's Retry-After writes a fresh 'sending' record first", function()
    local s = run_watched("send429", 20, 1000, { concurrency = 8 },
      { rate_limit = { status = 429, retry_after = 1, share = 0.15 } })
    assert.is_true(s.retries > 0)
  end)

  it("a JSONL plan by assetId, results file with every row's outcome", function()
    local plan = dir .. "/plan.jsonl"
    write_plan(plan, 20, "jsonl")
    local s = assert(batch.run(client(), plan, { journal = dir .. "/jj", out = dir .. "/creds.jsonl",
      results = dir .. "/results.csv" }))
    assert.equal(20, s.done)
    local lines = 0
    for line in io.lines(dir .. "/creds.jsonl") do
      local r = cjson.decode(line)
      assert.is_string(r.deviceSecret)
      lines = lines + 1
    end
    assert.equal(20, lines)
    local results = H.readfile(dir .. "/results.csv")
    assert.matches("line,target,newDeviceKey,assetId,outcome,error_kind,error_code,message", results, 1, true)
    local _, count = results:gsub("replaced", "")
    assert.equal(20, count)
  end)

  it("a replaced row whose secret cannot be read is not done: it stays out of the credentials file until resume", function()
    local plan = dir .. "/nosecret.csv"
    H.writefile(plan, "assetId,newDeviceKey\nA0000011,NEW-00011\nA0000012,NEW-00012\nA0000013,NEW-00013\n")
    local inner = require("enos.core").easy { timeout = 5 }
    local blind = true
    local t = { send = function(_, req)
      -- (the replace names the device by productKey + its current key OLD-00012, a read by assetId A0000012)
      local mine = req.url:find("00012", 1, true)
      if blind and mine and req.url:find("requireSecret=true", 1, true) then
        return nil, { kind = "transport", message = "hooked: secret read lost", request_sent = true }
      end
      local res, err = inner:send(req)
      if blind and mine and req.url:find("action=replaceDevice", 1, true) then
        -- applied by the server, reply lost on the way back
        return nil, { kind = "transport", message = "hooked: reply lost", request_sent = true }
      end
      return res, err
    end }
    local c = assert(enos.client { endpoint = h.url, access_key = "ak", secret_key = "sk", org_id = ORG,
      private_key_file = kp.private_file, transport = t })
    local journal, out = dir .. "/jns", dir .. "/cns.csv"
    local s = assert(batch.run(c, plan, { journal = journal, out = out, settle_ms = 10, backoff_ms = 5 }))
    assert.equal(2, s.done)
    assert.equal(1, s.failed)
    local creds = H.readfile(out)
    assert.falsy(creds:find("A0000012", 1, true), "a credentials line without its secret")
    assert.matches("A0000012,unknown,transport", H.readfile(journal .. ".results.csv"), 1, true)
    -- the replace did happen; a resume with a working network recovers the secret
    blind = false
    local r = assert(batch.run(c, plan, { journal = journal, out = out, resume = true, settle_ms = 10 }))
    assert.equal(1, r.reconciled)
    assert.equal(0, r.failed)
    local d = h:device("A0000012")
    local found
    for line in io.lines(out) do
      local cells = require("enos.plan").split_csv(line)
      if cells[2] == "A0000012" then found = cells end
    end
    assert.is_table(found, "no credentials for A0000012 after resume")
    assert.equal("NEW-00012", found[4])
    assert.equal(d.deviceSecret, found[5])
  end)

  it("credentials lines lost after the journal said done (a power cut) are re-written on resume, once", function()
    local plan = dir .. "/cut.csv"
    H.writefile(plan, "assetId,newDeviceKey\nA0000021,NEW-00021\nA0000022,NEW-00022\nA0000023,NEW-00023\n" ..
      "A0000024,NEW-00024\n")
    local journal, out = dir .. "/jcut", dir .. "/ccut.csv"
    local s = assert(batch.run(client(), plan, { journal = journal, out = out }))
    assert.equal(4, s.done)
    -- the disk kept the journal but only the header and the first row of the credentials file
    local lines = {}
    for line in io.lines(out) do lines[#lines + 1] = line end
    H.writefile(out, lines[1] .. "\n" .. lines[2] .. "\n", "600")
    local function replaces()
      local n = 0
      for _, e in ipairs(h:log()) do if e.op == "replaceDevice" then n = n + 1 end end
      return n
    end
    local before = replaces()
    local r = assert(batch.run(client(), plan, { journal = journal, out = out, resume = true }))
    assert.equal(4, r.skipped)
    assert.equal(before, replaces())          -- recovered from the journal, nothing replaced again
    local seen = {}
    for line in io.lines(out) do
      local cells = require("enos.plan").split_csv(line)
      if cells[2] ~= "assetId" then
        assert.is_nil(seen[cells[2]], cells[2] .. " written twice")
        assert.equal(h:device(cells[2]).deviceSecret, cells[5])
        seen[cells[2]] = true
      end
    end
    for i = 21, 24 do assert.is_true(seen[("A%07d"):format(i)], "missing A00000" .. i) end
  end)

  it("qps caps the request rate for the whole batch (a burst of qps, then qps a second)", function()
    local plan = dir .. "/plan_qps.csv"
    write_plan(plan, 100)
    local t0 = core.monotonic_ms()
    local s = assert(batch.run(client(), plan, { concurrency = 16, qps = 40, journal = dir .. "/j_qps",
      settle_ms = 10 }))
    local elapsed = (core.monotonic_ms() - t0) / 1000
    assert.equal(100, s.done)
    -- every request took a token: after the first 40, one per 1/40 s
    local least = (s.requests - 40) / 40
    assert.is_true(s.requests >= 100)
    assert.is_true(elapsed >= least * 0.95, ("%d requests in %.2f s, at least %.2f s expected"):format(
      s.requests, elapsed, least))
  end)

  it("records a row that fails for good and goes on", function()
    local plan = dir .. "/conflict.csv"
    -- row 2 wants a key another device of the product already has
    H.writefile(plan, "assetId,newDeviceKey\nA0000001,NEW-00001\nA0000002,OLD-00003\nA0000004,NEW-00004\n")
    local s = assert(batch.run(client(), plan, { journal = dir .. "/jc", out = dir .. "/cc.csv" }))
    assert.equal(2, s.done)
    assert.equal(1, s.failed)
    assert.equal(1, s.failed_by_kind.conflict)
    local results = H.readfile(dir .. "/jc.results.csv")
    assert.matches("A0000002,OLD%-00003,A0000002,failed,conflict,11702", results)
  end)

  it("kill -9 at several points, then --resume: every row done exactly once, every secret recoverable", function()
    local n = 200
    local plan = dir .. "/plan-kill.csv"
    write_plan(plan, n)
    local journal, out = dir .. "/jk", dir .. "/ck.csv"
    -- slow replaces: at each kill some are in flight (journaled "sending", applied by the server)
    h:admin("POST", "/faults", { latency_ms = 150, match = "replaceDevice" })
    local env = ("LUA_PATH='lua/?.lua;lua/?/init.lua;;' LUA_CPATH='build/%s/?.so;;' "):format(FLAVOUR)
    local cmd = ("%s %s spec/fixtures/run_batch.lua %s ak sk %s %s %s %s %s"):format(env, FLAVOUR, h.url, ORG,
      kp.private_file, plan, journal, out)
    local function journal_lines()
      local f = io.open(journal)
      if not f then return 0 end
      local c = 0
      for _ in f:lines() do c = c + 1 end
      f:close()
      return c
    end
    for _, at in ipairs { 3, 40, 120 } do
      local pid = H.sh("sh -c '" .. cmd:gsub("'", "'\\''") .. " >/dev/null 2>&1 & echo $!'"):gsub("%s+", "")
      local waited = 0
      while journal_lines() < at and waited < 200 do os.execute("sleep 0.05") waited = waited + 1 end
      os.execute("kill -9 " .. pid .. " 2>/dev/null")
      os.execute("sleep 0.1")
    end
    h:admin("POST", "/faults", { ambiguous_share = 0.05 })
    local s = assert(batch.run(client(), plan, { journal = journal, out = out, resume = true, settle_ms = 50 }))
    h:admin("DELETE", "/faults")
    local function failures(path)
      local bad = {}
      for line in io.lines(path) do
        if line:find(",failed,", 1, true) or line:find(",unknown,", 1, true) then bad[#bad + 1] = line end
      end
      return table.concat(bad, "\n")
    end
    assert.equal(0, s.failed, failures(journal .. ".results.csv"))
    assert.equal(n, s.done + s.skipped)
    assert.is_true(s.skipped > 0)
    assert.is_true(s.reconciled > 0, "no in-flight row was reconciled")
    assert_all_done(h, n, out, journal)
  end)
end)
