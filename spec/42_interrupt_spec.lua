-- Ctrl-C, as a person presses it: bin/enos-replace as a real process, SIGINT while a replace is in flight
-- (the simulator holds it), and what the command says: OUTCOME UNKNOWN and the command that recovers the
-- secret (exit 5) for `device`; "continue with --resume" (exit 5) for a batch, whose resume then finishes
-- every row exactly once. Never a Lua traceback, never a secret.
local sim = dofile("spec/sim_helper.lua")
local H = require "helpers"

local ORG = "o15724268424841"
local INTERP = type(jit) == "table" and "luajit" or "lua5.4"

local function q(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

describe("Ctrl-C", function()
  local h, kp, dir
  setup(function()
    kp = H.keypair()
    dir = H.tmpdir()
    local devices = {}
    for i = 1, 40 do
      devices[i] = { productKey = "pk_demo", deviceKey = ("OLD-%05d"):format(i), assetId = ("I%07d"):format(i) }
    end
    h = sim.start { config = { apps = { { access_key = "ak", secret_key = "sk-never-printed", public_key_file = kp.public_file } },
      devices = devices, log_size = 5000 } }
  end)
  teardown(function()
    if h then h:stop() end
    if dir then H.sh("rm -rf " .. dir) end
  end)

  -- Runs bin/enos-replace ARGS in the background, sends SIGINT after `after` seconds; returns rc, stdout, stderr.
  local function interrupt(args, after, sig)
    local env = ("ENOS_ENDPOINT=%s ENOS_ACCESS_KEY=ak ENOS_SECRET_KEY=sk-never-printed ENOS_ORG_ID=%s " ..
      "ENOS_PRIVATE_KEY_FILE=%s ENOS_CONFIG=/nonexistent ENOS_TIMEOUT=3"):format(q(h.url), ORG, q(kp.private_file))
    local out, err, rcf = dir .. "/out", dir .. "/err", dir .. "/rc"
    os.execute(("env %s %s bin/enos-replace %s </dev/null >%s 2>%s & pid=$!; sleep %s; kill -INT $pid; " ..
      "wait $pid; echo $? >%s"):format(env, INTERP, args, out, err, tostring(after), rcf):gsub("kill %-INT", "kill -" ..
      (sig or "INT")))
    return tonumber(H.readfile(rcf)), H.readfile(out), H.readfile(err)
  end

  it("during a device replace: OUTCOME UNKNOWN, the recovery command, exit 5; the command recovers it", function()
    assert.equal(200, (h:admin("POST", "/faults", { latency_ms = 2000, match = "replaceDevice", count = 1 })))
    local rc, out, err = interrupt(("device --asset-id I0000001 --new-key NEW-00001 --out %s --yes"):format(
      q(dir .. "/dev1.json")), 1)
    h:admin("DELETE", "/faults")
    assert.equal(5, rc, err)
    assert.matches("OUTCOME UNKNOWN for asset I0000001", err, 1, true)
    assert.matches("enos-replace get --asset-id I0000001 --secret --out", err, 1, true)
    assert.falsy(err:find("traceback", 1, true), err)
    assert.falsy(err:find("internal error", 1, true), err)
    assert.falsy((out .. err):find("sk-never-printed", 1, true))
    -- the platform did apply it; the printed command recovers the secret
    local d = h:device("I0000001")
    assert.equal("NEW-00001", d.deviceKey)
    assert.falsy((out .. err):find(d.deviceSecret, 1, true))
    local cmd = err:match("(enos%-replace get [^\n]+)")
    local rc2 = os.execute(("ENOS_ENDPOINT=%s ENOS_ACCESS_KEY=ak ENOS_SECRET_KEY=sk-never-printed ENOS_ORG_ID=%s " ..
      "ENOS_PRIVATE_KEY_FILE=%s ENOS_CONFIG=/nonexistent %s bin/%s >/dev/null 2>&1"):format(q(h.url), ORG,
      q(kp.private_file), INTERP, cmd))
    assert.is_true(rc2 == true or rc2 == 0)
    local rec = require("cjson").decode(H.readfile(dir .. "/dev1.json.recovered"))
    assert.equal(d.deviceSecret, rec.deviceSecret)
  end)

  for k, sig in ipairs { "TERM", "HUP" } do
    it("SIG" .. sig .. " during a device replace (a CI timeout, a closed session) says the same as Ctrl-C", function()
      local asset, key = ("I%07d"):format(36 + k), ("NEW-%05d"):format(36 + k)
      assert.equal(200, (h:admin("POST", "/faults", { latency_ms = 2000, match = "replaceDevice", count = 1 })))
      local rc, _, err = interrupt(("device --asset-id %s --new-key %s --out %s --yes"):format(asset, key,
        q(dir .. "/sig" .. sig .. ".json")), 1, sig)
      h:admin("DELETE", "/faults")
      assert.equal(5, rc, err)
      assert.matches("OUTCOME UNKNOWN for asset " .. asset, err, 1, true)
      assert.matches("enos-replace get --asset-id " .. asset .. " --secret --out", err, 1, true)
      assert.equal(key, h:device(asset).deviceKey)
    end)
  end

  it("before anything was sent (at the confirmation prompt's read): nothing changed, exit 130", function()
    -- a preflight held by the simulator: interrupted before the replace was confirmed
    assert.equal(200, (h:admin("POST", "/faults", { latency_ms = 2000, match = "get", count = 1 })))
    local rc, _, err = interrupt("device --asset-id I0000002 --new-key NEW-00002 --out " .. q(dir .. "/dev2.json") ..
      " --yes", 1)
    h:admin("DELETE", "/faults")
    assert.equal(130, rc, err)
    assert.matches("interrupted; nothing was changed", err, 1, true)
    assert.falsy(err:find("traceback", 1, true), err)
    assert.equal("OLD-00002", h:device("I0000002").deviceKey)
  end)

  it("during a batch: 'continue with --resume', exit 5; that resume finishes every row exactly once", function()
    local plan = dir .. "/plan.csv"
    local lines = { "assetId,newDeviceKey" }
    for i = 10, 29 do lines[#lines + 1] = ("I%07d,NEW-%05d"):format(i, i) end
    H.writefile(plan, table.concat(lines, "\n") .. "\n")
    assert.equal(200, (h:admin("POST", "/faults", { latency_ms = 300, match = "replaceDevice" })))
    local rc, _, err = interrupt(("batch %s --out %s --concurrency 2 --yes"):format(q(plan), q(dir .. "/creds.csv")), 1.5)
    h:admin("DELETE", "/faults")
    assert.equal(5, rc, err)
    assert.matches("interrupted. The journal is consistent", err, 1, true)
    assert.falsy(err:find("traceback", 1, true), err)
    local cmd = err:match("(enos%-replace batch [^\n]+%-%-resume)")
    assert.is_string(cmd, err)
    local env = ("ENOS_ENDPOINT=%s ENOS_ACCESS_KEY=ak ENOS_SECRET_KEY=sk-never-printed ENOS_ORG_ID=%s " ..
      "ENOS_PRIVATE_KEY_FILE=%s ENOS_CONFIG=/nonexistent ENOS_TIMEOUT=3"):format(q(h.url), ORG, q(kp.private_file))
    local ok = os.execute(("env %s %s bin/%s >%s/out2 2>%s/err2"):format(env, INTERP, cmd, dir, dir))
    assert.is_true(ok == true or ok == 0, H.readfile(dir .. "/err2"))
    local count = {}
    for _, e in ipairs(h:log()) do
      if e.op == "replaceDevice" and e.code == 0 then
        local qs = require("enos.core").parse_query(e.query or "") or {}
        count[qs.deviceKey] = (count[qs.deviceKey] or 0) + 1
      end
    end
    local creds = H.readfile(dir .. "/creds.csv")
    for i = 10, 29 do
      local asset = ("I%07d"):format(i)
      assert.equal(("NEW-%05d"):format(i), h:device(asset).deviceKey)
      assert.equal(1, count[("OLD-%05d"):format(i)], asset)
      assert.truthy(creds:find(asset, 1, true), asset)
    end
  end)
end)
