-- The journal binds a run to the plan it checked, and a resume trusts nothing blindly: rows added to the plan
-- while it runs do not run, the plan / journal / outputs must be four files, a resume with another plan or an
-- altered journal is refused (or, with reverify, checked against the platform), and a torn last line is
-- repaired so that any number of resumes finish every row exactly once.
local enos = require "enos"
local batch = require "enos.batch"
local cli = require "enos.cli"
local cjson = require "cjson"
local H = require "helpers"
local sim = dofile("spec/sim_helper.lua")

local ORG = "o15724268424841"

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() return true end
  return false
end

local function append(path, text)
  local f = assert(io.open(path, "ab"))
  f:write(text)
  f:close()
end

describe("journal integrity", function()
  local h, kp, dir, n
  setup(function()
    kp = H.keypair()
    dir = H.tmpdir()
    local devices = {}
    for i = 1, 70 do      -- (61-70: the lock and the identity)
      devices[i] = { productKey = "pk_demo", deviceKey = ("OLD-%05d"):format(i), assetId = ("J%07d"):format(i) }
    end
    h = sim.start { config = { apps = { { access_key = "ak", secret_key = "sk", public_key_file = kp.public_file } },
      devices = devices, log_size = 5000 } }
    n = 0
  end)
  teardown(function()
    if h then h:stop() end
    if dir then H.sh("rm -rf " .. dir) end
  end)

  local function client()
    return assert(enos.client { endpoint = h.url, access_key = "ak", secret_key = "sk", org_id = ORG,
      private_key_file = kp.private_file, timeout = 5 })
  end
  -- a fresh sub-directory and a plan of rows first..last (assetId, newDeviceKey)
  local function plan_of(first, last, suffix)
    n = n + 1
    local d = dir .. "/t" .. n
    H.sh("mkdir -p " .. d)
    local lines = { "assetId,newDeviceKey" }
    for i = first, last do lines[#lines + 1] = ("J%07d,NEW-%05d%s"):format(i, i, suffix or "") end
    H.writefile(d .. "/plan.csv", table.concat(lines, "\n") .. "\n")
    return d, d .. "/plan.csv"
  end
  local function opts(d, extra)
    local o = { journal = d .. "/plan.journal", out = d .. "/creds.csv", settle_ms = 10, backoff_ms = 5 }
    for k, v in pairs(extra or {}) do o[k] = v end
    return o
  end
  local function replaces_of(asset)
    local count = 0
    for _, e in ipairs(h:log()) do
      if e.op == "replaceDevice" and e.code == 0 then
        local q = require("enos.core").parse_query(e.query or "") or {}
        if q.assetId == asset or q.deviceKey == "OLD-" .. asset:sub(4) then count = count + 1 end
      end
    end
    return count
  end

  it("a journal is locked while its batch runs: a second run on it is refused, and resumes once it ended",
    function()
    local d, plan = plan_of(61, 63)
    local second
    local s = assert(batch.run(client(), plan, opts(d, { progress = function()
      if not second then
        local r, err = batch.run(client(), plan, opts(d, { resume = true }))
        second = { r = r, err = err }
      end
    end })))
    assert.equal(3, s.done)
    assert.is_nil(second.r)
    assert.equal("config", second.err.kind)
    assert.matches("journal " .. d .. "/plan.journal is in use", second.err.message, 1, true)
    for i = 61, 63 do assert.equal(1, replaces_of(("J%07d"):format(i))) end
    -- ended: the lock is gone with it
    local again = assert(batch.run(client(), plan, opts(d, { resume = true })))
    assert.equal(3, again.skipped)
  end)

  it("a resume against another organization or application is refused before anything is sent", function()
    local d, plan = plan_of(64, 65)
    assert(batch.run(client(), plan, opts(d, { out = d .. "/c.csv" })))
    local before = #h:log()
    local other = assert(enos.client { endpoint = h.url, access_key = "ak2-other", secret_key = "sk", org_id = "o_other",
      private_key_file = kp.private_file, timeout = 5 })
    local r, err = batch.run(other, plan, opts(d, { out = d .. "/c.csv", resume = true }))
    assert.is_nil(r)
    assert.equal("config", err.kind)
    assert.matches("journal " .. d .. "/plan.journal was written against another platform or application", err.message,
      1, true)
    assert.matches("org " .. ORG .. ", now o_other", err.message, 1, true)
    assert.matches("application ak…, now ak2-…", err.message, 1, true)
    assert.equal(before, #h:log())               -- not one request
  end)


  it("rows added to the plan while the batch runs do not run: exactly the checked rows", function()
    local d, plan = plan_of(1, 6)
    local appended = false
    local s = assert(batch.run(client(), plan, opts(d, { concurrency = 1, progress = function(p)
      if not appended and p.done >= 1 then
        appended = true
        append(plan, "J0000007,NEW-00007\nJ0000008,NEW-00008\n")
      end
    end })))
    assert.is_true(appended)
    assert.equal(6, s.total)
    assert.equal(6, s.done)
    assert.equal("OLD-00007", h:device("J0000007").deviceKey)
    assert.equal("OLD-00008", h:device("J0000008").deviceKey)
    assert.equal("NEW-00001", h:device("J0000001").deviceKey)
    assert.equal(1, replaces_of("J0000001"))
    -- and a resume with the plan as it is now is refused: it is not the plan this journal checked
    local r, err = batch.run(client(), plan, opts(d, { resume = true }))
    assert.is_nil(r)
    assert.matches("is not the one journal " .. d .. "/plan.journal was started with", err.message, 1, true)
    assert.equal("OLD-00007", h:device("J0000007").deviceKey)
  end)

  it("the plan, the journal, --out and --results must be four files (also through a symlink), nothing left", function()
    local d, plan = plan_of(30, 31)
    H.sh(("ln -s %s/creds.csv %s/creds-link.csv && : > %s/creds.csv"):format(d, d, d))
    local cases = {
      { journal = plan },
      { journal = d .. "/./plan.csv" },
      { out = plan },
      { results = d .. "/creds.csv", out = d .. "/creds.csv", journal = d .. "/x.journal" },
      { journal = d .. "/creds-link.csv", out = d .. "/creds.csv" },
      { results = d .. "/plan.journal" },
    }
    local before = #h:log()
    for i, c in ipairs(cases) do
      local o = { settle_ms = 10 }
      for k, v in pairs(c) do o[k] = v end
      if not o.journal then o.journal = d .. "/plan.journal" end
      local s, err = batch.run(client(), plan, o)
      assert.is_nil(s, "case " .. i)
      assert.equal("invalid_argument", err.kind, "case " .. i .. ": " .. tostring(err))
      assert.matches("are the same file", err.message, 1, true)
      assert.is_false(exists(d .. "/plan.journal"), "case " .. i .. " left a journal")
      assert.is_false(exists(d .. "/x.journal"), "case " .. i .. " left a journal")
    end
    assert.equal(before, #h:log())
    assert.equal("OLD-00030", h:device("J0000030").deviceKey)
    -- the CLI says the same, exit 2 (two outputs that do not exist yet, one file)
    local e = {}
    local code = cli.main { argv = { "batch", plan, "--out", d .. "/c2.csv", "--results", d .. "/./c2.csv", "--yes" },
      env = { ENOS_ENDPOINT = h.url,
      ENOS_ACCESS_KEY = "ak", ENOS_SECRET_KEY = "sk", ENOS_ORG_ID = ORG, ENOS_CONFIG = d .. "/none", HOME = d,
      ENOS_PRIVATE_KEY_FILE = kp.private_file },
      stdout = function() end, stderr = function(x) e[#e + 1] = x end }
    assert.equal(2, code, table.concat(e))
    assert.matches("same file", table.concat(e), 1, true)
    assert.is_false(exists(d .. "/plan.journal"))
  end)

  it("a resume with a corrected plan is refused naming the lines; --reverify reads back and finishes", function()
    local d, plan = plan_of(10, 12, "-TYPO")
    local s = assert(batch.run(client(), plan, opts(d)))
    assert.equal(3, s.done)
    assert.equal("NEW-00011-TYPO", h:device("J0000011").deviceKey)
    -- the operator fixes the typo in row 2 and resumes
    H.writefile(plan, "assetId,newDeviceKey\nJ0000010,NEW-00010-TYPO\nJ0000011,NEW-00011\nJ0000012,NEW-00012-TYPO\n")
    local before = #h:log()
    local r, err = batch.run(client(), plan, opts(d, { resume = true }))
    assert.is_nil(r)
    assert.equal("invalid_argument", err.kind)
    assert.matches("--reverify", err.message, 1, true)
    assert.equal(before, #h:log())                  -- refused before any request
    -- with reverify: rows 1 and 3 are confirmed on the platform, row 2 is not done there, so it runs
    r = assert(batch.run(client(), plan, opts(d, { resume = true, reverify = true })))
    assert.equal(0, r.failed)
    assert.equal(1, r.done)
    assert.equal(2, r.reverified)
    assert.equal("NEW-00011", h:device("J0000011").deviceKey)
    assert.equal("NEW-00010-TYPO", h:device("J0000010").deviceKey)
    assert.equal(1, replaces_of("J0000010"))
  end)

  it("a forged done record is refused (wrong key) or, with reverify, not trusted (never ran)", function()
    local d, plan = plan_of(13, 14)
    append(plan, "J0000098,NEW-00098\n")           -- row 3's device does not exist: the row fails, stays to do
    local s = assert(batch.run(client(), plan, opts(d)))
    assert.equal(2, s.done)
    assert.equal(1, s.failed)
    local journal = d .. "/plan.journal"
    -- a done record for row 2 naming a key the device never had
    append(journal, cjson.encode { key = "a::J0000014", line = 3, state = "done", assetId = "J0000014",
      newDeviceKey = "FORGED-00014", ts = 1 } .. "\n")
    local r, err = batch.run(client(), plan, opts(d, { resume = true }))
    assert.is_nil(r)
    assert.matches("journal line %d+ says plan line 3 is done with newDeviceKey FORGED%-00014", err.message)
    -- a done record for row 3 with the plan's key: a plain resume would skip it; reverify reads it back
    append(journal, cjson.encode { key = "a::J0000014", line = 3, state = "done", assetId = "J0000014",
      newDeviceKey = "NEW-00014", ts = 2 } .. "\n")
    append(journal, cjson.encode { key = "a::J0000098", line = 4, state = "done", assetId = "J0000098",
      newDeviceKey = "NEW-00098", ts = 3 } .. "\n")
    r = assert(batch.run(client(), plan, opts(d, { resume = true, reverify = true })))
    assert.equal(2, r.reverified)           -- rows 1 and 2, as the platform shows them
    assert.equal(1, r.failed)               -- row 3: not done on the platform (no such device), run, fails again
    assert.falsy(H.readfile(d .. "/creds.csv"):find("J0000098", 1, true))
  end)

  it("a torn last line is set aside and cut; any number of resumes finish every row exactly once", function()
    local d, plan = plan_of(20, 23)
    append(plan, "J0000099,NEW-00099\n")           -- row 5's device does not exist yet: it fails the first run
    local s = assert(batch.run(client(), plan, opts(d)))
    assert.equal(4, s.done)
    local journal = d .. "/plan.journal"
    append(journal, '{"key":"a::J0000099","line":6,"state":"send')         -- the power went mid-write
    h:seed { productKey = "pk_demo", deviceKey = "OLD-00099", assetId = "J0000099" }
    local r = assert(batch.run(client(), plan, opts(d, { resume = true })))
    assert.equal(1, r.done)
    assert.equal(4, r.skipped)
    assert.matches("torn last line", table.concat(r.warnings, " "), 1, true)
    -- every line of the journal is a whole record now, the fragment kept aside
    for line in io.lines(journal) do assert.is_table(cjson.decode(line), line) end
    local aside = H.sh("ls " .. d .. " | grep -c 'plan.journal.torn-'")
    assert.equal("1", aside:gsub("%s", ""))
    -- torn again (a whole record without its line end, then a fragment), resumed twice more
    append(journal, '{"t":"note"}')
    local r2 = assert(batch.run(client(), plan, opts(d, { resume = true })))
    assert.equal(5, r2.skipped)
    append(journal, '{"key":"a::J00')
    local r3 = assert(batch.run(client(), plan, opts(d, { resume = true })))
    assert.equal(5, r3.skipped)
    assert.equal(0, r3.failed)
    for line in io.lines(journal) do assert.is_table(cjson.decode(line), line) end
    for _, i in ipairs { 20, 21, 22, 23, 99 } do
      local asset = ("J%07d"):format(i)
      assert.equal(("NEW-%05d"):format(i), h:device(asset).deviceKey)
      assert.equal(1, replaces_of(asset), asset)
    end
    local creds, count = H.readfile(d .. "/creds.csv"), 0
    for _ in creds:gmatch("J00000%d%d,") do count = count + 1 end
    assert.equal(5, count)                       -- each device once in the credentials file
  end)

  for _, fmt in ipairs { "csv", "jsonl" } do
    it("a credentials line torn mid-secret (" .. fmt .. ", a full disk or power cut) is set aside and written " ..
      "again on resume, not counted delivered", function()
      local first = fmt == "csv" and 40 or 45
      local d, plan = plan_of(first, first + 3)
      local out = d .. "/creds." .. fmt
      assert(batch.run(client(), plan, opts(d, { out = out })))
      -- the last line cut in the middle of its secret, as a full disk leaves it
      local text = H.readfile(out)
      local last_start = text:sub(1, -2):match(".*()\n") + 1
      -- (rows are written as they complete, in any order: the last line's own asset)
      local last = text:sub(last_start, -2)
      local last_asset = fmt == "jsonl" and cjson.decode(last).assetId or require("enos.plan").split_csv(last)[2]
      local secret = h:device(last_asset).deviceSecret
      local at = text:find(secret, last_start, true)
      assert.truthy(at)
      H.writefile(out, text:sub(1, at + 4))
      local s = assert(batch.run(client(), plan, opts(d, { out = out, resume = true })))
      assert.equal(4, s.skipped)
      assert.truthy(s.warnings[1]:find("torn last line", 1, true), s.warnings[1])
      local seen = {}
      for line in io.lines(out) do
        local asset, sec
        if fmt == "jsonl" then
          local r = cjson.decode(line)
          asset, sec = r.assetId, r.deviceSecret
        else
          local cells = require("enos.plan").split_csv(line)
          asset, sec = cells[2], cells[5]
        end
        if asset ~= "assetId" then
          assert.is_nil(seen[asset], "twice: " .. asset)
          seen[asset] = true
          assert.equal(h:device(asset).deviceSecret, sec)
        end
      end
      for k = first, first + 3 do assert.is_true(seen[("J%07d"):format(k)], "missing row " .. k) end
      assert.truthy(H.sh("ls " .. d):find("creds." .. fmt .. ".torn-", 1, true))
    end)
  end
end)
