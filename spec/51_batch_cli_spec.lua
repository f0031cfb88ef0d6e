-- enos-replace batch: the command a person runs, in-process and as a real process.
local sim = dofile("spec/sim_helper.lua")
local cli = require "enos.cli"
local cjson = require "cjson"
local H = require "helpers"

local ORG = "o15724268424841"
local AK, SK = "batch-cli-ak", "batch-cli-secret-key-never-printed"
local FLAVOUR = type(jit) == "table" and "luajit" or "lua5.4"

describe("enos-replace batch", function()
  local h, kp, dir
  setup(function()
    kp = H.keypair()
    dir = H.tmpdir()
    local devices = {}
    for i = 1, 150 do         -- (121-140: the stdin plans; 26-29: the refused outputs; 141-150: progress)
      devices[i] = { productKey = "pk_demo", deviceKey = ("OLD-%05d"):format(i), assetId = ("B%07d"):format(i) }
    end
    h = sim.start { config = { apps = { { access_key = AK, secret_key = SK, public_key_file = kp.public_file } },
      devices = devices, log_size = 5000 } }
  end)
  teardown(function()
    if h then h:stop() end
    if dir then os.execute("rm -rf " .. dir) end
  end)

  local function env(extra)
    local e = { ENOS_ENDPOINT = h.url, ENOS_ACCESS_KEY = AK, ENOS_SECRET_KEY = SK, ENOS_ORG_ID = ORG,
      ENOS_PRIVATE_KEY_FILE = kp.private_file, HOME = dir, ENOS_CONFIG = dir .. "/none" }
    for k, v in pairs(extra or {}) do e[k] = v end
    return e
  end
  local function run(argv, opts)
    opts = opts or {}
    local o, e = {}, {}
    local code = cli.main { argv = argv, env = env(opts.env), stdout = function(s) o[#o + 1] = s end,
      stderr = function(s) e[#e + 1] = s end, isatty = opts.isatty or false, stderr_tty = opts.stderr_tty,
      stdin = opts.stdin or function() return opts.answer end }
    return code, table.concat(o), table.concat(e)
  end
  local function plan(name, first, last)
    local p = dir .. "/" .. name
    local f = assert(io.open(p, "w"))
    f:write("productKey,deviceKey,newDeviceKey,crew\n")
    for i = first, last do f:write(("pk_demo,OLD-%05d,NEW-%05d,crew-%d\n"):format(i, i, i)) end
    f:close()
    return p
  end

  it("--check lists every error with its line and exits 2, sending nothing", function()
    local p = dir .. "/bad.csv"
    H.writefile(p, "productKey,deviceKey,newDeviceKey\npk_demo,OLD-00001,NEW-00001\npk_demo,OLD-00002,NEW-00001\n"
      .. "pk_demo,OLD-00003,no\n")
    local before = #h:log()
    local code, _, err = run { "batch", p, "--check" }
    assert.equal(2, code)
    assert.matches("bad.csv:3: newDeviceKey NEW%-00001 is also the new key of line 2", err)
    assert.matches("bad.csv:4: newDeviceKey must be", err)
    assert.equal(before, #h:log())
    code = run { "batch", p, "--yes", "--out", dir .. "/x.csv" }
    assert.equal(2, code)
    assert.equal(before, #h:log())
  end)

  it("--check on a good plan says so", function()
    local code, _, err = run { "batch", plan("good.csv", 1, 3), "--check" }
    assert.equal(0, code)
    assert.matches("3 row%(s%), no errors", err)
  end)

  it("refuses without a terminal and without --yes, and without a place for the secrets", function()
    local p = plan("p1.csv", 1, 2)
    local code, _, err = run { "batch", p, "--out", dir .. "/c1.csv" }
    assert.equal(2, code)
    assert.matches("confirmation", err)
    code, _, err = run { "batch", p, "--yes" }
    assert.equal(2, code)
    assert.matches("%-%-out", err)
  end)

  it("without a private key refuses to start (the secrets could not be read) unless --no-secret", function()
    local nokey = { ENOS_PRIVATE_KEY_FILE = false }
    for _, extra in ipairs { { "--out", dir .. "/c_nokey.csv" }, {} } do
      local argv = { "batch", plan("p_nokey.csv", 1, 2), "--yes" }
      for _, a in ipairs(extra) do argv[#argv + 1] = a end
      local code, _, err = run(argv, { env = nokey })
      assert.equal(2, code, err)
      assert.matches("no private key is configured", err, 1, true)
      assert.matches("--no-secret", err, 1, true)
    end
    for i = 1, 2 do assert.equal(("OLD-%05d"):format(i), h:device(("B%07d"):format(i)).deviceKey) end
    assert.is_nil(io.open(dir .. "/c_nokey.csv"))
    local code, _, err = run({ "batch", plan("p_nokey3.csv", 3, 3), "--yes", "--no-secret" }, { env = nokey })
    assert.equal(0, code, err)
    assert.equal("NEW-00003", h:device("B0000003").deviceKey)
  end)

  it("a wrong secret key stops the batch (and --dry-run) at once: one error, exit 3, no journal", function()
    local p = plan("p_badkey.csv", 1, 3)
    for _, extra in ipairs { { "--out", dir .. "/c_badkey.csv", "--yes" }, { "--no-secret", "--yes" }, { "--dry-run" } } do
      local argv = { "batch", p }
      for _, a in ipairs(extra) do argv[#argv + 1] = a end
      local before = #h:log()
      local code, _, err = run(argv, { env = { ENOS_SECRET_KEY = "not-the-secret-key" } })
      assert.equal(3, code, err)
      assert.matches("auth", err, 1, true)
      local _, lines = err:gsub("\n", "")
      assert.is_true(lines <= 2, err)
      assert.equal(1, #h:log() - before, "one token request, nothing else")
      assert.is_nil(io.open(p .. ".journal"))
    end
    assert.equal("OLD-00001", h:device("B0000001").deviceKey)
  end)

  it("asks on a terminal and does nothing when not confirmed", function()
    local before = #h:log()
    local code, _, err = run({ "batch", plan("p2.csv", 4, 5), "--out", dir .. "/c2.csv" }, { isatty = true, answer = "n" })
    assert.equal(1, code)
    assert.matches("About to replace 2 device", err)
    assert.equal(before, #h:log())
  end)

  it("runs a plan: summary, JSON, credentials 0600 with extra columns, no secret on the terminal", function()
    local creds = dir .. "/c3.csv"
    local code, out, err = run { "batch", plan("p3.csv", 6, 25), "--out", creds, "--yes", "--json", "--concurrency", "4" }
    assert.equal(0, code, err)
    local s = cjson.decode(out)
    assert.equal(20, s.done)
    assert.equal(0, s.failed)
    assert.matches("20 row%(s%): 20 done", err)
    assert.equal("600", (H.sh("stat -c %a " .. creds):gsub("%s+", "")))
    local text = H.readfile(creds)
    assert.matches("^line,assetId,productKey,deviceKey,deviceSecret,encryptedSecret,sessionKey,outcome,crew\n", text)
    assert.matches(",crew%-6\n", text)
    local _, list = h:admin("GET", "/devices")
    for _, d in ipairs(list.data) do
      assert.falsy((out .. err):find(d.deviceSecret, 1, true))
    end
    assert.falsy((out .. err):find(SK, 1, true))
  end)

  it("the progress line: live (\\r, erase) on a terminal; plain lines with TERM=dumb, NO_COLOR or no terminal",
    function()
    local cases = {
      { 141, 143, { TERM = "dumb" }, true, false },
      { 144, 146, { TERM = "xterm", NO_COLOR = "1" }, true, false },
      { 147, 148, { TERM = "xterm" }, false, false },
      { 149, 150, { TERM = "xterm" }, true, true },
    }
    for i, case in ipairs(cases) do
      local first, last, extra, tty, live = case[1], case[2], case[3], case[4], case[5]
      local n = last - first + 1
      local code, _, err = run({ "batch", plan("p_prog" .. i .. ".csv", first, last), "--out",
        dir .. "/c_prog" .. i .. ".csv", "--yes" }, { env = extra, stderr_tty = tty })
      assert.equal(0, code, err)
      assert.matches(n .. "/" .. n .. " finished", err, 1, true)
      if live then
        assert.truthy(err:find("\r\27[K", 1, true), "case " .. i .. ": no live line")
      else
        assert.falsy(err:find("\27", 1, true), "case " .. i .. ": escape codes in " .. err)
        assert.falsy(err:find("\r", 1, true), "case " .. i .. ": carriage return in " .. err)
      end
    end
  end)

  it("reads a plan from stdin with -: check (errors named stdin:LINE), run, and the same through a pipe", function()
    local bad = dir .. "/bad_stdin.csv"
    H.writefile(bad, "productKey,deviceKey,newDeviceKey\npk_demo,OLD-00121,NEW-00121\npk_demo,OLD-00122,NEW-00121\n")
    local before = #h:log()
    local f = assert(io.open(bad, "rb"))
    local code, _, err = run({ "batch", "-", "--check" }, { stdin = f })
    f:close()
    assert.equal(2, code)
    assert.matches("stdin:3: newDeviceKey NEW%-00121 is also the new key of line 2", err)
    -- a run needs a journal name and --yes (stdin is the plan, not an answer)
    f = assert(io.open(plan("p_stdin.csv", 121, 125), "rb"))
    code, _, err = run({ "batch", "-", "--out", dir .. "/c_stdin.csv", "--yes" }, { stdin = f })
    assert.equal(2, code)
    assert.matches("needs %-%-journal", err)
    code, _, err = run({ "batch", "-", "--out", dir .. "/c_stdin.csv", "--journal", dir .. "/j_stdin" }, { stdin = f })
    assert.equal(2, code)
    assert.matches("%-%-yes", err)
    assert.equal(before, #h:log())
    code, _, err = run({ "batch", "-", "--out", dir .. "/c_stdin.csv", "--journal", dir .. "/j_stdin", "--yes" },
      { stdin = f })
    f:close()
    assert.equal(0, code, err)
    assert.matches("5 row%(s%): 5 done", err)
    for i = 121, 125 do assert.equal(("NEW-%05d"):format(i), h:device(("B%07d"):format(i)).deviceKey) end
    assert.equal(5, select(2, H.readfile(dir .. "/c_stdin.csv"):gsub(",crew%-12%d\n", "")))
    -- a real pipe into the real command
    local cmd = ("cd %s && cat %s | ENOS_ENDPOINT=%s ENOS_ACCESS_KEY=%s ENOS_SECRET_KEY=%s ENOS_ORG_ID=%s "
      .. "ENOS_PRIVATE_KEY_FILE=%s ENOS_CONFIG=/nonexistent %s bin/enos-replace batch - --out %s --journal %s --yes"
      .. " >%s/pipe.log 2>&1; echo $?"):format(sim.root, plan("p_pipe.csv", 126, 128), h.url, AK, SK, ORG,
      kp.private_file, FLAVOUR, dir .. "/c_pipe.csv", dir .. "/j_pipe", dir)
    assert.equal("0", (H.sh(cmd):gsub("%s+", "")), H.readfile(dir .. "/pipe.log"))
    for i = 126, 128 do assert.equal(("NEW-%05d"):format(i), h:device(("B%07d"):format(i)).deviceKey) end
  end)

  it("a real process killed with -9 mid-run, then --resume: every row done once", function()
    local p = plan("p4.csv", 30, 120)
    local creds, journal = dir .. "/c4.csv", dir .. "/j4"
    h:admin("POST", "/faults", { latency_ms = 100, match = "replaceDevice" })
    local cmd = ("cd %s && ENOS_ENDPOINT=%s ENOS_ACCESS_KEY=%s ENOS_SECRET_KEY=%s ENOS_ORG_ID=%s "
      .. "ENOS_PRIVATE_KEY_FILE=%s ENOS_CONFIG=/nonexistent ENOS_TIMEOUT=2 %s bin/enos-replace batch %s --out %s "
      .. "--journal %s --yes --concurrency 8 --read-batch 20"):format(sim.root, h.url, AK, SK, ORG, kp.private_file, FLAVOUR, p, creds,
      journal)
    local pid = H.sh("sh -c '" .. cmd .. " >" .. dir .. "/run.log 2>&1 & echo $!'"):gsub("%s+", "")
    for _ = 1, 200 do
      local f = io.open(journal)
      local n = 0
      if f then for l in f:lines() do if l:find('"state":"done"', 1, true) then n = n + 1 end end f:close() end
      if n >= 10 then break end        -- (killed once some rows are done, others in flight: windows of 20 rows)
      os.execute("sleep 0.05")
    end
    os.execute("kill -9 " .. pid)
    h:admin("DELETE", "/faults")
    local code, out, err = run { "batch", p, "--out", creds, "--journal", journal, "--resume", "--yes", "--json" }
    assert.equal(0, code, err)
    local s = cjson.decode(out)
    assert.is_true(s.skipped >= 10 and s.skipped < 91, "not killed mid-run: " .. s.skipped .. " rows skipped")
    assert.equal(91, s.done + s.skipped)
    assert.matches(("resuming: %d of 91 rows remain"):format(91 - s.skipped), err, 1, true)
    local _, list = h:admin("GET", "/devices")
    local by = {}
    for _, d in ipairs(list.data) do by[d.assetId] = d end
    local seen = {}
    local first = true
    for line in io.lines(creds) do
      if first then first = false else
        local cells = require("enos.plan").split_csv(line)
        assert.is_nil(seen[cells[2]], "written twice: " .. cells[2])
        seen[cells[2]] = true
        assert.equal(by[cells[2]].deviceSecret, cells[5])
      end
    end
    for i = 30, 120 do
      local d = by[("B%07d"):format(i)]
      assert.equal(("NEW-%05d"):format(i), d.deviceKey)
      assert.is_true(seen[d.assetId], "no credentials for " .. d.assetId)
    end
  end)

  it("refuses what would hang or leak before anything is sent: a FIFO output, a --resume whose journal is not " ..
    "there, a resume into a credentials file others can read", function()
    local p = plan("p_refuse.csv", 26, 27)
    local fifo = dir .. "/fifo"
    H.sh("mkfifo " .. fifo)
    for _, flag in ipairs { "--out", "--journal", "--results" } do
      local argv = { "batch", p, "--yes", "--out", dir .. "/cr.csv" }
      if flag == "--out" then argv[5] = fifo else argv[#argv + 1] = flag argv[#argv + 1] = fifo end
      local code, _, err = run(argv)
      assert.equal(2, code, err)
      assert.truthy(err:find(fifo, 1, true), err)
    end
    local code, _, err = run { "batch", p, "--yes", "--out", dir .. "/cr.csv", "--journal", dir .. "/typo.journal",
      "--resume" }
    assert.equal(2, code, err)
    assert.truthy(err:find("no journal at " .. dir .. "/typo.journal", 1, true), err)
    assert.is_nil(io.open(dir .. "/typo.journal"))
    -- a batch interrupted with rows left, its credentials file then opened to everyone: the resume refuses
    local journal, creds = dir .. "/open.journal", dir .. "/open.csv"
    H.writefile(journal, "")
    H.writefile(creds, "line,assetId\n")
    H.sh("chmod 644 " .. creds)
    code, _, err = run { "batch", p, "--yes", "--out", creds, "--journal", journal, "--resume" }
    assert.equal(3, code, err)
    assert.truthy(err:find("can be read by other users (mode 644)", 1, true), err)
    for _, e in ipairs(h:log()) do
      if e.op == "replaceDevice" then
        local q = require("enos.core").parse_query(e.query or "") or {}
        assert.is_falsy(q.deviceKey == "OLD-00026" or q.deviceKey == "OLD-00027", "a refused batch sent a replace")
      end
    end
    assert.equal("OLD-00026", h:device("B0000026").deviceKey)
  end)
end)
