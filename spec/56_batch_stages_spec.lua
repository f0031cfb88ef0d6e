-- The batch's stages, each on its own: the gate every request goes through (rate, 429/503 backoff, the
-- before_send hook), the group commit (a row counts only once its record is durable), the outputs, the
-- reader (plan windows read in bulk, in-flight rows reconciled in bulk), the verifier, progress, and the
-- one reconcile judgement. Fakes stand in for the gateway: what is asserted is what each stage sends and
-- concludes.
local errors = require "enos.errors"
local scheduler = require "enos.scheduler"
local journal_mod = require "enos.journal"
local gate_mod = require "enos.batch.gate"
local commit_mod = require "enos.batch.commit"
local outputs = require "enos.batch.outputs"
local reader_mod = require "enos.batch.reader"
local verifier_mod = require "enos.batch.verifier"
local progress = require "enos.batch.progress"
local reconcile = require "enos.reconcile"
local H = require "helpers"

-- A scheduler whose clock moves only when a task sleeps (the gate's waits, without waiting).
local function virtual_sched()
  local t = 0
  local s = {}
  s.now = function() return t end
  function s.sleep(_, sec) t = t + sec * 1000 end
  function s.wait_for() end
  return s
end

-- A transport answering from a script (one status per attempt; then 200), noting when each request left.
local function scripted(sched, statuses, headers)
  local base = { sent = {} }
  function base.send(_, req)
    base.sent[#base.sent + 1] = { at = sched.now(), call = req.call }
    local st = statuses[#base.sent] or 200
    return { status = st, headers = headers or {}, body = "{}" }
  end
  return base
end

local GATE = { retry_attempts = 8, backoff_ms = 250, backoff_max_ms = 30000, max_retry_after = 300 }
local function gate_opts(extra)
  local o = {}
  for k, v in pairs(GATE) do o[k] = v end
  for k, v in pairs(extra or {}) do o[k] = v end
  return o
end

describe("batch gate", function()
  it("caps the rate: at qps 10, 21 requests take 1.1 s after the first second's burst of 10", function()
    local sched = virtual_sched()
    local base = scripted(sched, {})
    local g = gate_mod.new(sched, base, gate_opts { qps = 10 })
    for _ = 1, 21 do g.transport:send { call = "get_device" } end
    assert.equal(21, #base.sent)
    assert.equal(21, g.requests)
    assert.near(1100, base.sent[21].at, 1)
    for i = 12, 21 do assert.near(100, base.sent[i].at - base.sent[i - 1].at, 1) end
  end)

  it("honours Retry-After on a 429, and cuts one longer than max_retry_after (and says so)", function()
    local sched = virtual_sched()
    local base = scripted(sched, { 429 }, { ["retry-after"] = "2" })
    local g = gate_mod.new(sched, base, gate_opts())
    local res = g.transport:send { call = "replace_device" }
    assert.equal(200, res.status)
    assert.equal(2, #base.sent)
    assert.equal(2000, base.sent[2].at)
    assert.equal(1, g.retries)
    assert.is_nil(g.retry_after_cut)

    sched = virtual_sched()
    base = scripted(sched, { 429 }, { ["retry-after"] = "1000" })
    g = gate_mod.new(sched, base, gate_opts { max_retry_after = 5 })
    g.transport:send { call = "get_device" }
    assert.equal(5000, base.sent[2].at)
    assert.equal(1000, g.retry_after_cut)
  end)

  it("never sends a replace again after a 503 (it may have been applied); a read, yes", function()
    local sched = virtual_sched()
    local base = scripted(sched, { 503 })
    local g = gate_mod.new(sched, base, gate_opts { random = function() return 0.5 end })
    assert.equal(503, g.transport:send({ call = "replace_device" }).status)
    assert.equal(1, #base.sent)
    base = scripted(sched, { 503 })
    g = gate_mod.new(sched, base, gate_opts { random = function() return 0.5 end })
    assert.equal(200, g.transport:send({ call = "get_device" }).status)
    assert.equal(2, #base.sent)
    assert.equal(250, base.sent[2].at - base.sent[1].at)      -- half the first backoff ceiling (500 ms)
  end)

  it("gives up after retry_attempts and hands the refusal back", function()
    local sched = virtual_sched()
    local base = scripted(sched, { 429, 429, 429, 429 })
    local g = gate_mod.new(sched, base, gate_opts { retry_attempts = 3 })
    assert.equal(429, g.transport:send({ call = "get_device" }).status)
    assert.equal(3, #base.sent)
  end)

  it("calls before_send before every attempt leaves, after the rate let it go", function()
    local sched = virtual_sched()
    local base = scripted(sched, { 429 }, { ["retry-after"] = "1" })
    local seen = {}
    local g = gate_mod.new(sched, base, gate_opts { qps = 1, before_send = function(req)
      seen[#seen + 1] = { at = sched.now(), call = req.call, sent = #base.sent }
    end })
    g.transport:send { call = "replace_device" }
    assert.equal(2, #seen)
    assert.same({ at = 0, call = "replace_device", sent = 0 }, seen[1])
    assert.same({ at = 1000, call = "replace_device", sent = 1 }, seen[2])
    assert.equal(1000, base.sent[2].at)
  end)
end)

describe("batch group commit", function()
  local dir
  setup(function() dir = H.tmpdir() end)

  local function quiet_outputs()
    return { write = function() return true end, take_sync = function() return nil end }
  end

  it("counts a row only once its record is durable, in journal order", function()
    local sched = scheduler.new {}
    local journal = assert(journal_mod.open(dir .. "/j1"))
    local counted = {}
    local c = commit_mod.new(sched, journal, quiet_outputs(), { commit_ms = 0,
      on_durable = function(what) counted[#counted + 1] = what end })
    for i = 1, 3 do c:finish({ key = "k" .. i, line = i }, { state = "done" }, "replaced" .. i) end
    assert.same({}, counted)
    local woke
    sched:spawn(function() c:wait(3) woke = journal:durable(3) end)
    sched.before_wait = function() return c:turn() end
    while sched:count() > 0 do sched:step(0.05) c:turn() end
    assert.is_true(woke)
    assert.same({ "replaced1", "replaced2", "replaced3" }, counted)
    assert.is_nil(c:failed())
    journal:close()
    sched:close()
    local text = H.readfile(dir .. "/j1")
    assert.truthy(text:find('"key":"k3"', 1, true))
    assert.truthy(text:find('"line":3', 1, true))
  end)

  it("stops naming the file a write failed on", function()
    local sched = scheduler.new {}
    local journal = assert(journal_mod.open(dir .. "/j2"))
    local c = commit_mod.new(sched, journal, { take_sync = function() end,
      write = function() return nil, "results file /x/r.csv", "write failed: No space left on device" end },
      { commit_ms = 0, on_durable = function() end })
    local ok, err = pcall(c.turn, c)
    assert.is_false(ok)
    assert.equal("cannot write the results file /x/r.csv: No space left on device; free the space, then resume", err)
    journal:close()
    sched:close()
  end)
end)

describe("batch outputs", function()
  local dir
  setup(function() dir = H.tmpdir() end)

  local function row(i) return { line = i + 1, target = { productKey = "pk", deviceKey = "D" .. i, newDeviceKey = "N" .. i },
    extra = { site = "Site " .. i } } end

  it("writes each new key's credentials once, the plan's extra columns kept, and a result per row", function()
    local outs = assert(outputs.open { out = dir .. "/c.csv", results = dir .. "/r.csv", extra_columns = { "site" },
      present = { N3 = true } })
    for i = 1, 3 do
      local new = { assetId = "A" .. i, productKey = "pk", deviceKey = "N" .. i,
        encrypted = { deviceSecret = "ENC" .. i, sessionKey = "SK" .. i } }
      outs:deliver(row(i), new, "replaced")
      outs:deliver(row(i), new, "replaced")        -- (a second delivery of one key writes nothing)
      outs:result(row(i), "replaced", "A" .. i)
    end
    outs:result(row(4), "failed", nil, errors.new("not_found", "device not found", { code = 11404 }))
    assert.is_nil(outs:take_sync())            -- encrypted pairs: the journal holds them, no extra fsync
    assert.is_true(outs:delivered("N3"))
    assert.is_false(outs:delivered("N9"))
    assert.is_true(outs:write())
    outs:close()
    assert.equal("line,assetId,productKey,deviceKey,deviceSecret,encryptedSecret,sessionKey,outcome,site\n" ..
      "2,A1,pk,N1,,ENC1,SK1,replaced,Site 1\n3,A2,pk,N2,,ENC2,SK2,replaced,Site 2\n", H.readfile(dir .. "/c.csv"))
    local r = H.readfile(dir .. "/r.csv")
    assert.truthy(r:find("^line,target,newDeviceKey,assetId,outcome,error_kind,error_code,message,site\n"))
    assert.truthy(r:find("\n5,pk/D4,N4,,failed,not_found,11404,device not found,Site 4\n", 1, true))
    assert.equal("600", H.sh("stat -c %a " .. dir .. "/c.csv"):gsub("%s+$", ""))
  end)

  it("a clear secret no journal record holds is fsynced with the next group", function()
    local outs = assert(outputs.open { out = dir .. "/c2.jsonl", results = dir .. "/r2.csv" })
    outs:deliver(row(1), { assetId = "A1", productKey = "pk", deviceKey = "N1", deviceSecret = "clear" }, "replaced")
    assert.is_not_nil(outs:take_sync())
    assert.is_nil(outs:take_sync())
    outs:close()
    assert.truthy(H.readfile(dir .. "/c2.jsonl"):find('"deviceSecret":"clear"', 1, true))
  end)

  it("refuses to overwrite an output unless resuming", function()
    H.writefile(dir .. "/taken.csv", "x\n")
    local outs, err = outputs.open { out = dir .. "/taken.csv", results = dir .. "/r3.csv" }
    assert.is_nil(outs)
    assert.truthy(err:find("already exists", 1, true))
  end)
end)

-- A gateway for the reader, the verifier and reconcile: devices by assetId; Search Device answers
-- `assetId in (...)`; `hidden` assets are missing from searches (a lagging index); `no_secret` ones come
-- without their secret. Counts calls.
local function fake_client(devices, opts)
  opts = opts or {}
  local c = { api_version = "v2.4", calls = { search = 0, get = 0 } }
  function c.has_private_key() return true end
  local function copy(d, with_secret)
    local r = {}
    for k, v in pairs(d) do r[k] = v end
    if not with_secret or (opts.no_secret or {})[d.assetId] then r.deviceSecret = nil end
    return r
  end
  function c.search_devices(_, p)
    c.calls.search = c.calls.search + 1
    local list = {}
    for v in p.expression:gmatch("'([^']*)'") do
      local d = devices[v]
      if d and not (opts.hidden or {})[v] then list[#list + 1] = copy(d, p.requireSecret) end
    end
    return list, { totalSize = #list }
  end
  function c.get_device(_, p)
    c.calls.get = c.calls.get + 1
    local d = devices[p.assetId]
    if not d then return nil, errors.new("not_found", "no such device", { code = 11404 }) end
    return copy(d, p.requireSecret)
  end
  return c
end

describe("reconcile", function()
  it("judges a read-back: replaced, unchanged, elsewhere, or another device", function()
    local want = { assetId = "A1", newDeviceKey = "N1", old_key = "O1" }
    assert.equal("replaced", reconcile.judge({ assetId = "A1", deviceKey = "N1" }, want))
    assert.equal("unchanged", reconcile.judge({ assetId = "A1", deviceKey = "O1" }, want))
    assert.equal("elsewhere", reconcile.judge({ assetId = "A1", deviceKey = "X" }, want))
    assert.equal("other", reconcile.judge({ assetId = "A2", deviceKey = "N1" }, want))
    assert.equal("unchanged", reconcile.judge({ assetId = "A1", deviceKey = "X" }, { assetId = "A1", newDeviceKey = "N1" }))
  end)

  it("reads a window in one search; only the rows it leaves unclear are read alone", function()
    local devices = {
      A1 = { assetId = "A1", productKey = "pk", deviceKey = "N1", deviceSecret = "s1" },     -- done
      A2 = { assetId = "A2", productKey = "pk", deviceKey = "O2", deviceSecret = "s2" },     -- not done
      A3 = { assetId = "A3", productKey = "pk", deviceKey = "N3", deviceSecret = "s3" },     -- lagging index
      A4 = { assetId = "A4", productKey = "pk", deviceKey = "N4" },                          -- no secret yet
    }
    local c = fake_client(devices, { hidden = { A3 = true }, no_secret = { A4 = true } })
    local items = {}
    for i = 1, 5 do items[i] = { target = { assetId = "A" .. i, newDeviceKey = "N" .. i } } end
    local pauses = 0
    local v = reconcile.window(c, items, { require_secret = true, read_attempts = 3, window = 100,
      sleep = function() end, pause = function() pauses = pauses + 1 end })
    assert.equal("done", v[1].state)
    assert.equal("s1", v[1].device.deviceSecret)
    assert.equal("not_done", v[2].state)
    assert.equal("O2", v[2].device.deviceKey)
    assert.equal("done", v[3].state)
    assert.equal("unclear", v[4].state)        -- the new key, but never its secret: resume again
    assert.equal("not_done", v[5].state)       -- no such device
    assert.is_nil(v[5].device)
    assert.same({ search = 1, get = 1 + 3 + 1 }, c.calls)
    assert.equal(2, pauses)                    -- between A4's three lone reads
  end)

  it("a journal without the asset reads the product's device holding the new key", function()
    local c = fake_client({})
    function c.get_device(_, p)
      c.calls.get = c.calls.get + 1
      assert.same({ productKey = "pk", deviceKey = "N1", requireSecret = true }, p)
      return { assetId = "A1", productKey = "pk", deviceKey = "N1", deviceSecret = "s" }
    end
    local v = reconcile.window(c, { { target = { productKey = "pk", deviceKey = "O1", newDeviceKey = "N1" } } },
      { require_secret = true, read_attempts = 2 })
    assert.equal("done", v[1].state)
    assert.same({ search = 0, get = 1 }, c.calls)
  end)
end)

describe("batch reader", function()
  it("reads the plan a window at a time, fresh rows' devices and in-flight rows' read-backs in bulk", function()
    local devices = {}
    for i = 1, 250 do
      local key = (i > 10 and i <= 15) and ("NK-" .. i) or ("OK-" .. i)      -- rows 11-15 were replaced at the crash
      devices["A" .. i] = { assetId = "A" .. i, productKey = "pk", deviceKey = key, deviceSecret = "s" .. i }
    end
    local c = fake_client(devices)
    local by_key = {}
    local rows = {}
    for i = 1, 250 do
      rows[i] = { line = i + 1, fields = { assetId = "A" .. i, newDeviceKey = "NK-" .. i } }
    end
    local plan_mod = require "enos.plan"
    for i = 1, 20 do
      local key = plan_mod.target_key(assert(plan_mod.check_row(rows[i].fields)))
      by_key[key] = i <= 10 and { state = "done", assetId = "A" .. i }
        or { state = "sending", assetId = "A" .. i, ts = 0, timeout = 1 }
    end
    local k = 0
    local sched = scheduler.new {}
    local r = reader_mod.new(sched, c, function() k = k + 1 return rows[k] end, { read_batch = 100, ahead = 100,
      read_attempts = 2, max_retry_after = 1, settle_ms = 0, timeout = 1, require_secret = true, by_key = by_key })
    local got = {}
    sched:spawn(function() r:run() end)
    sched:spawn(function()        -- (a while loop: plain Lua 5.1 cannot yield inside a for-in iterator)
      while true do
        local row = r:next()
        if not row then break end
        got[#got + 1] = row
      end
    end)
    while sched:count() > 0 do sched:step(0.05) end
    sched:close()
    assert.equal(250, #got)
    for i = 1, 250 do assert.equal(i + 1, got[i].line) end
    for i = 1, 10 do assert.is_nil(got[i].device) assert.is_nil(got[i].back) end      -- done: not read
    for i = 11, 15 do assert.equal("done", got[i].back.state) end
    for i = 16, 20 do
      assert.equal("not_done", got[i].back.state)
      assert.equal("OK-" .. i, got[i].device.deviceKey)           -- the preflight may take it
      assert.is_nil(got[i].device.deviceSecret)                 -- without its (old) secret
    end
    for i = 21, 250 do assert.equal("A" .. i, got[i].device.assetId) end
    -- three windows of fresh rows, one of in-flight rows: four searches, no lone read
    assert.same({ search = 4, get = 0 }, c.calls)
  end)
end)

describe("batch verifier", function()
  it("reads settled rows back in one search, a disagreeing row alone, and hands each its verdict", function()
    local devices = {}
    for i = 1, 5 do
      devices["A" .. i] = { assetId = "A" .. i, productKey = "pk", deviceKey = "N" .. i, status = "inactive" }
    end
    devices.A5.status = "disable"
    local c = fake_client(devices, { hidden = { A3 = true } })
    local lagging = devices.A2
    local search = c.search_devices
    function c.search_devices(self, p)            -- the index still shows A2's old key
      devices.A2 = { assetId = "A2", productKey = "pk", deviceKey = "O2", status = "inactive" }
      local l, pg = search(self, p)
      devices.A2 = lagging
      return l, pg
    end
    local sched = scheduler.new {}
    local verdicts = {}
    local v = verifier_mod.new(sched, c, { read_batch = 100, settle_ms = 20, read_attempts = 2, max_retry_after = 1,
      on_verified = function(row, _, problems) verdicts[row.i] = problems end })
    v:expect(1)
    sched:spawn(function()
      for i = 1, 5 do
        v:add({ i = i, target = { newDeviceKey = "N" .. i } },
          { new = { assetId = "A" .. i, deviceKey = "N" .. i }, old = { productKey = "pk" } })
      end
      v:done()
    end)
    sched:spawn(function() v:run() end)
    while sched:count() > 0 do sched:step(0.05) end
    sched:close()
    for i = 1, 4 do assert.same({}, verdicts[i], "row " .. i) end
    assert.same({ "status is disable, expected inactive" }, verdicts[5])
    -- one search; A2 (old key in the index) and A5 (its status) read alone; A3 (missing) read by the bulk read
    assert.same({ search = 1, get = 3 }, c.calls)
  end)
end)

describe("batch progress", function()
  it("on a resume, counts only the rows the journal did not hold as done", function()
    -- 100 rows, 40 done by an earlier run (skipped now), 30 done and 10 failed by this one in 10 s
    local p = progress.snapshot({ total = 100, done = 30, skipped = 40, failed = 10, retries = 0, already = 40 },
      10, nil, false)
    assert.equal(60, p.total)
    assert.equal(40, p.done)
    assert.equal(4, p.rate)
    assert.equal(5, p.eta)            -- 20 rows left at 4/s, not 20 + 40
    assert.equal(40, p.already)
  end)
  it("counts skipped rows as finished but not in the rate", function()
    local p = progress.snapshot({ total = 100, done = 30, skipped = 50, failed = 10, retries = 2 }, 10, nil, false)
    assert.same({ done = 90, total = 100, rate = 4, eta = 2.5, retries = 2, failed = 10, elapsed = 10,
      final = false, already = 0 }, p)
    assert.is_nil(progress.snapshot({ total = 1, done = 0, skipped = 0, failed = 0, retries = 0 }, 0, 1, false).eta)
  end)
end)
