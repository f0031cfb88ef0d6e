-- The fault matrix: each fault of FAULTS, against a single client:replace_device, enos.workflow.replace
-- and a small enos.batch.run, with what the user sees (error kind, retryable, whether the request left,
-- whether the device changed, whether the new secret is recoverable, the command's exit code).
-- docs/faults.md holds the same table; the last test checks that it says what this file proves.
local enos = require "enos"
local workflow = require "enos.workflow"
local batch = require "enos.batch"
local cli = require "enos.cli"
local plan_mod = require "enos.plan"
local core = require "enos.core"
local H = require "helpers"
local E = dofile("spec/70_fault_env.lua")
local N = dofile("spec/60_ngx_helper.lua")
local cjson = require "cjson"

local ORG = "o15724268424841"
local BATCH_ROWS = 3

local DEVICES = {}
for i = 1, 2 do
  DEVICES[#DEVICES + 1] = { productKey = "pk_demo", deviceKey = ("OLD-A%03d"):format(i), assetId = ("A%03d"):format(i) }
end
for i = 1, 8 do
  DEVICES[#DEVICES + 1] = { productKey = "pk_demo", deviceKey = ("OLD-B%03d"):format(i), assetId = ("B%03d"):format(i) }
end

local function fault(env, f) assert.equal(200, (env.sim:admin("POST", "/faults", f))) end
local function expire(env) assert.equal(200, (env.sim:admin("POST", "/tokens/expire"))) end

-- The matrix. endpoint(env) -> URL (default: the simulator); arm(env, where) sets the fault after the
-- client holds a token (where = "single" | "workflow" | "batch"); during(env, progress, state) runs
-- from the batch's progress callback. Expectations:
--   single:   kind, retryable, sent (request_sent; nil = not asserted), changed, ok (success)
--   workflow: ok, outcome, kind, changed, exit (enos-replace exit code)
--   batch:    done, replaced, reconciled, failed, kind (of every failed row)
-- note fields are prose for docs/faults.md.
local FAULTS = {
  { id = "refused", name = "connection refused",
    endpoint = function(env) return env.refused_url end,
    single = { kind = "transport", retryable = true, sent = false, changed = false },
    workflow = { ok = false, outcome = "refused", kind = "transport", changed = false, exit = 5,
      note = "preflight read tried 3 times" },
    batch = { done = 0, failed = BATCH_ROWS, kind = "transport" } },
  { id = "dns", name = "DNS failure (`.invalid` host)",
    endpoint = function() return "https://enos-fault.invalid:4443" end,
    single = { kind = "transport", retryable = true, sent = false, changed = false },
    workflow = { ok = false, outcome = "refused", kind = "transport", changed = false, exit = 5,
      note = "preflight read tried 3 times" },
    batch = { done = 0, failed = BATCH_ROWS, kind = "transport" } },
  { id = "connect_timeout", name = "connect timeout (accept queue full)",
    endpoint = function(env) return env.blackhole_url end,
    single = { kind = "timeout", retryable = true, sent = false, changed = false },
    workflow = { ok = false, outcome = "refused", kind = "timeout", changed = false, exit = 5,
      note = "preflight read tried 3 times" },
    batch = { done = 0, failed = BATCH_ROWS, kind = "timeout" } },
  { id = "read_timeout", name = "read timeout mid-body (headers and half the body, then silence)",
    endpoint = function(env) return env:front_url("stall", 0) end,
    single = { kind = "timeout", retryable = true, sent = true, changed = true },
    workflow = { ok = true, outcome = "reconciled", changed = true, exit = 0 },
    batch = { done = BATCH_ROWS, reconciled = BATCH_ROWS, failed = 0 } },
  { id = "tls_untrusted", name = "TLS: certificate from an untrusted CA", tls = true,
    endpoint = function(env) return env.tls.untrusted end,
    single = { kind = "tls", retryable = false, sent = false, changed = false },
    workflow = { ok = false, outcome = "refused", kind = "tls", changed = false, exit = 5,
      note = "not retried" },
    batch = { done = 0, failed = BATCH_ROWS, kind = "tls" } },
  { id = "tls_wronghost", name = "TLS: certificate for another host name", tls = true,
    endpoint = function(env) return env.tls.wronghost end,
    single = { kind = "tls", retryable = false, sent = false, changed = false },
    workflow = { ok = false, outcome = "refused", kind = "tls", changed = false, exit = 5,
      note = "not retried" },
    batch = { done = 0, failed = BATCH_ROWS, kind = "tls" } },
  { id = "tls_expired", name = "TLS: expired certificate", tls = true,
    endpoint = function(env) return env.tls.expired end,
    single = { kind = "tls", retryable = false, sent = false, changed = false },
    workflow = { ok = false, outcome = "refused", kind = "tls", changed = false, exit = 5,
      note = "not retried" },
    batch = { done = 0, failed = BATCH_ROWS, kind = "tls" } },
  { id = "stale_token", name = "401 with a stale token (tokens expired on the server)", batch_rows = 8,
    arm = function(env, where) if where ~= "batch" then expire(env) end end,
    during = function(env, p, state)
      if not state.fired and p.done >= 1 and p.done < p.total then state.fired = true expire(env) end
    end,
    single = { ok = true, changed = true, note = "a new token is fetched once and the call re-sent" },
    workflow = { ok = true, outcome = "replaced", changed = true, exit = 0 },
    batch = { done = 8, replaced = 8, failed = 0, note = "tokens expired mid-batch" } },
  { id = "rate_limited_retry_after", name = "429 with `Retry-After: 1` (once)",
    arm = function(env) fault(env, { rate_limit = { status = 429, retry_after = 1, every = 1 }, count = 1,
      match = "replaceDevice" }) end,
    single = { kind = "rate_limited", retryable = true, changed = false, retry_after = 1 },
    workflow = { ok = true, outcome = "replaced", changed = true, exit = 0, min_sleep_ms = 1000,
      note = "reads back (unchanged), waits at least Retry-After, sends again" },
    batch = { done = BATCH_ROWS, replaced = BATCH_ROWS, failed = 0, retries = 1,
      note = "the whole batch pauses for Retry-After, the request is re-sent" } },
  { id = "rate_limited", name = "429 without `Retry-After` (once)",
    endpoint = function(env) return env:front_url("r429", 1) end,
    single = { kind = "rate_limited", retryable = true, changed = false, retry_after = false },
    workflow = { ok = true, outcome = "replaced", changed = true, exit = 0, min_sleep_ms = 1,
      note = "reads back (unchanged), backs off exponentially, sends again" },
    batch = { done = BATCH_ROWS, replaced = BATCH_ROWS, failed = 0, retries = 1,
      note = "jittered exponential backoff, the request is re-sent" } },
  { id = "server_500", name = "HTTP 500 (once, not applied)",
    arm = function(env) fault(env, { error_share = 1, error_status = 500, count = 1, match = "replaceDevice" }) end,
    single = { kind = "server", retryable = true, changed = false, status = 500 },
    workflow = { ok = true, outcome = "replaced", changed = true, exit = 0,
      note = "reads back (unchanged), sends again" },
    batch = { done = BATCH_ROWS, replaced = BATCH_ROWS, failed = 0 } },
  { id = "server_503", name = "HTTP 503 (once, not applied)",
    arm = function(env) fault(env, { error_share = 1, error_status = 503, count = 1, match = "replaceDevice" }) end,
    single = { kind = "server", retryable = true, changed = false, status = 503 },
    workflow = { ok = true, outcome = "replaced", changed = true, exit = 0,
      note = "reads back (unchanged), sends again" },
    batch = { done = BATCH_ROWS, replaced = BATCH_ROWS, failed = 0 } },
  { id = "truncated", name = "truncated JSON (applied, half the body, connection closed)",
    arm = function(env) fault(env, { truncate_share = 1, count = 1, match = "replaceDevice" }) end,
    single = { kind = "transport", retryable = true, sent = true, changed = true },
    workflow = { ok = true, outcome = "reconciled", changed = true, exit = 0 },
    batch = { done = BATCH_ROWS, reconciled = 1, replaced = BATCH_ROWS - 1, failed = 0 } },
  { id = "nonjson", name = "non-JSON body (applied, HTTP 200 with HTML)",
    arm = function(env) fault(env, { nonjson_share = 1, count = 1, match = "replaceDevice" }) end,
    single = { kind = "protocol", retryable = false, changed = true },
    workflow = { ok = true, outcome = "reconciled", changed = true, exit = 0 },
    batch = { done = BATCH_ROWS, reconciled = 1, replaced = BATCH_ROWS - 1, failed = 0 } },
  { id = "envelope", name = "HTTP 200 with an unexpected JSON envelope (applied)",
    endpoint = function(env) return env:front_url("envelope", 0) end,
    single = { kind = "protocol", retryable = false, changed = true },
    workflow = { ok = true, outcome = "reconciled", changed = true, exit = 0 },
    batch = { done = BATCH_ROWS, reconciled = BATCH_ROWS, failed = 0 } },
  { id = "huge", name = "huge body (9 MiB > the 8 MiB `max_body`, applied)",
    endpoint = function(env) return env:front_url("huge", 0) end,
    single = { kind = "protocol", retryable = false, sent = true, changed = true },
    workflow = { ok = true, outcome = "reconciled", changed = true, exit = 0 },
    batch = { done = BATCH_ROWS, reconciled = BATCH_ROWS, failed = 0 } },
  { id = "drip", name = "slow drip body (a byte every 200 ms, past the timeout; applied)",
    endpoint = function(env) return env:front_url("drip", 0) end,
    single = { kind = "timeout", retryable = true, sent = true, changed = true },
    workflow = { ok = true, outcome = "reconciled", changed = true, exit = 0 },
    batch = { done = BATCH_ROWS, reconciled = BATCH_ROWS, failed = 0 } },
  { id = "ambiguous", name = "ambiguous drop after commit (applied, connection closed, no reply)",
    arm = function(env) fault(env, { ambiguous_share = 1, count = 1, match = "replaceDevice" }) end,
    single = { kind = "transport", retryable = true, sent = true, changed = true },
    workflow = { ok = true, outcome = "reconciled", changed = true, exit = 0 },
    batch = { done = BATCH_ROWS, reconciled = 1, replaced = BATCH_ROWS - 1, failed = 0 } },
  { id = "reply_other_asset", name = "hostile reply: names another asset (applied)",
    endpoint = function(env) return env:front_url("otherasset", 0) end,
    single = { kind = "protocol", retryable = false, changed = true },
    workflow = { ok = true, outcome = "reconciled", changed = true, exit = 0,
      note = "the reply's credentials are not used" },
    batch = { done = BATCH_ROWS, reconciled = BATCH_ROWS, failed = 0 } },
  { id = "reply_other_key", name = "hostile reply: names another device key (applied)",
    endpoint = function(env) return env:front_url("otherkey", 0) end,
    single = { kind = "protocol", retryable = false, changed = true },
    workflow = { ok = true, outcome = "reconciled", changed = true, exit = 0,
      note = "the reply's credentials are not used" },
    batch = { done = BATCH_ROWS, reconciled = BATCH_ROWS, failed = 0 } },
  { id = "reply_no_secret", name = "hostile reply: no secret though it was asked for (applied)",
    endpoint = function(env) return env:front_url("nosecret", 0) end,
    single = { ok = true, secret = false, changed = true, note = "without the secret (`deviceSecret` nil)" },
    workflow = { ok = true, outcome = "replaced", changed = true, exit = 0,
      note = "the secret is read with Get Device `requireSecret`" },
    batch = { done = BATCH_ROWS, replaced = BATCH_ROWS, failed = 0 } },
  { id = "reply_bad_secret", name = "hostile reply: a secret that does not decrypt (applied)",
    endpoint = function(env) return env:front_url("badsecret", 0) end,
    single = { ok = true, secret = false, changed = true,
      note = "without the secret (`deviceSecret` nil, `err` says why, the encrypted pair kept)" },
    workflow = { ok = true, outcome = "replaced", changed = true, exit = 0,
      note = "the secret is read with Get Device `requireSecret`" },
    batch = { done = BATCH_ROWS, replaced = BATCH_ROWS, failed = 0 } },
  { id = "token_outage", name = "token service down (503) after the first token, tokens expired",
    arm = function(env, where)
      if where == "batch" then return end
      expire(env)
      fault(env, { error_share = 1, error_status = 503, match = "token.get", count = 1000 })
    end,
    single = { kind = "server", retryable = true, changed = false },
    workflow = { ok = false, outcome = "refused", kind = "server", changed = false, exit = 5,
      note = "preflight read tried 3 times" },
    batch = { special = true,
      note = "transient (2 failures): retried, every row done. Persistent: rows in flight end `failed`/`unknown` " ..
        "(kind `server`), none lost; `--resume` after the outage finishes them, each device replaced once" } },
}

-- ---------------------------------------------------------------- rendering (docs/faults.md)

local function yes(b) return b and "yes" or "no" end

local function render_single(x)
  if x.ok then return "succeeds" .. (x.note and ("; " .. x.note) or "") end
  local parts = { "`" .. x.kind .. "`" .. (x.status and (" (HTTP " .. x.status .. ")") or ""),
    "retryable " .. yes(x.retryable) }
  if x.retry_after then parts[#parts + 1] = "`retry_after` = " .. x.retry_after end
  if x.retry_after == false then parts[#parts + 1] = "no `retry_after`" end
  if x.sent ~= nil then parts[#parts + 1] = "request sent " .. yes(x.sent) end
  parts[#parts + 1] = x.changed and "**device changed**; secret recoverable with Get Device `requireSecret`"
    or "device unchanged"
  return table.concat(parts, "; ")
end

local function render_workflow(x)
  local s
  if x.ok then
    s = "`" .. x.outcome .. "`" .. (x.outcome == "reconciled" and " (read back, secret fetched)" or "") ..
      ", secret delivered"
  else
    s = "fails: `" .. x.kind .. "`, outcome `" .. x.outcome .. "`, device unchanged"
  end
  if x.note then s = s .. "; " .. x.note end
  return s .. "; exit " .. x.exit
end

local function render_batch(x)
  if x.special then return x.note end
  local parts = {}
  if x.failed > 0 then
    parts[#parts + 1] = ("every row `failed` (`%s`), recorded in the results file; nothing changed"):format(x.kind)
  else
    local what = {}
    if (x.replaced or 0) > 0 then what[#what + 1] = x.replaced .. " replaced" end
    if (x.reconciled or 0) > 0 then what[#what + 1] = x.reconciled .. " reconciled" end
    parts[#parts + 1] = ("all %d rows done (%s), every secret in the credentials file"):format(x.done,
      table.concat(what, ", "))
  end
  if x.note then parts[#parts + 1] = x.note end
  return table.concat(parts, "; ")
end

-- The cosocket column: the workflow inside nginx (enos.transport.ngx); the same as the libcurl column
-- unless the fault says otherwise (f.cosocket).
local function render_cosocket(f)
  if not f.cosocket then return "as `workflow.replace`" end
  return render_workflow(f.cosocket)
end

local function render_row(f)
  return ("| %s | %s | %s | %s | %s |"):format(f.name, render_single(f.single), render_workflow(f.workflow),
    render_cosocket(f), render_batch(f.batch))
end

-- ---------------------------------------------------------------- the spec

describe("fault matrix", function()
  local env

  setup(function()
    env = E.start { config = { devices = DEVICES, log_size = 5000 } }
  end)
  teardown(function() if env then env:stop() end end)
  before_each(function()
    assert.equal(200, (env.sim:admin("POST", "/reset")))
  end)
  after_each(function() env.sim:admin("DELETE", "/faults") end)

  local function device(asset)
    local _, r = env.sim:admin("GET", "/devices/" .. asset)
    return r.data
  end

  local function client(f, extra)
    local opts = { endpoint = f.endpoint and f.endpoint(env) or env.sim.url, access_key = "fault-ak",
      secret_key = "fault-sk", org_id = ORG, private_key_file = env.kp.private_file, timeout = 1,
      connect_timeout = 1, cafile = f.tls and env.certs.ca or nil }
    for k, v in pairs(extra or {}) do opts[k] = v end
    return assert(enos.client(opts))
  end

  -- A token in hand before the fault is armed (the faults act on the replace, not the first token).
  local function prime(c)
    if c.endpoint:find(env.sim.url, 1, true) or c.endpoint:find("/f/", 1, true) then
      assert(c:get_device { assetId = "A002" })
    end
  end

  local function assert_recoverable(_, asset, expect_key)
    env.sim:admin("DELETE", "/faults")
    local d = device(asset)
    assert.equal(expect_key, d.deviceKey)
    local sc = client({}, {})
    local got = assert(sc:get_device { assetId = asset, requireSecret = true })
    assert.equal(d.deviceSecret, got.deviceSecret)
    sc:close()
    return got
  end

  -- An nginx whose /run runs a Lua chunk in a worker (enos picks the cosocket transport there by itself):
  -- the workflow of the cosocket column runs inside it, against the same simulator, front and TLS servers.
  local ngx_srv
  local function run_in_nginx(code)
    local st, body = N.http { method = "POST", url = ngx_srv.url .. "/run", body = code, timeout = 30 }
    assert.equal(200, st, body)
    local r = cjson.decode(body)
    assert(not r.lua_error, r.lua_error)
    return r
  end
  setup(function()
    ngx_srv = N.start_plain([[
    location = /run {
      content_by_lua_block {
        local cjson = require "cjson"
        ngx.req.read_body()
        local f = assert(loadstring(ngx.req.get_body_data()))
        local ok, r = pcall(f)
        ngx.say(cjson.encode(ok and r or { lua_error = tostring(r) }))
      }
    }
]], ("lua_ssl_trusted_certificate %s;"):format(env.certs.ca))
  end)
  teardown(function() if ngx_srv then ngx_srv.stop() end end)

  for _, f in ipairs(FAULTS) do
    describe(f.name, function()
      it("single replace_device: " .. render_single(f.single), function()
        local x = f.single
        local c = client(f)
        prime(c)
        if f.arm then f.arm(env, "single") end
        local r, err = c:replace_device { assetId = "A001", newDeviceKey = "NEW-A001", requireSecret = true }
        c:close()
        if x.ok then
          assert.is_table(r, tostring(err))
          assert.equal("NEW-A001", r.deviceKey)
          if x.secret == false then assert.is_nil(r.deviceSecret)
          else assert.equal(device("A001").deviceSecret, r.deviceSecret) end
        else
          assert.is_nil(r)
          assert.equal(x.kind, err.kind, tostring(err))
          assert.equal(x.retryable, err.retryable)
          if x.sent ~= nil then assert.equal(x.sent, err.request_sent, tostring(err)) end
          if x.status then assert.equal(x.status, err.status) end
          if x.retry_after then assert.equal(x.retry_after, err.retry_after) end
          if x.retry_after == false then assert.is_nil(err.retry_after) end
          assert.is_string(err.message)
          assert.falsy(tostring(err):find("fault-sk", 1, true))
        end
        if x.changed then
          assert_recoverable(c, "A001", "NEW-A001")
        else
          assert.equal("OLD-A001", device("A001").deviceKey)
        end
      end)

      it("workflow.replace: " .. render_workflow(f.workflow), function()
        local x = f.workflow
        local c = client(f)
        prime(c)
        if f.arm then f.arm(env, "workflow") end
        local slept = 0
        local report, err = workflow.replace(c, { assetId = "A001", newDeviceKey = "NEW-A001" }, {
          settle_ms = 0, backoff_ms = 4, backoff_max_ms = 8, sleep = function(s) slept = slept + s * 1000 end,
        })
        c:close()
        local exit = report and (report.error and cli.exit_code(report.error) or 0) or cli.exit_code(err)
        assert.equal(x.exit, exit, tostring(err or report))
        if x.ok then
          assert.is_table(report, tostring(err))
          assert.is_true(report.ok, tostring(report))
          assert.equal(x.outcome, report.outcome, tostring(report))
          assert.equal(device("A001").deviceSecret, report.new.deviceSecret)
          assert.falsy(tostring(report):find(report.new.deviceSecret, 1, true))
          if x.min_sleep_ms then assert.is_true(slept >= x.min_sleep_ms, "slept " .. slept .. " ms") end
        else
          assert.is_nil(report)
          assert.equal(x.kind, err.kind, tostring(err))
          assert.equal(x.outcome, err.report and err.report.outcome, tostring(err))
        end
        if x.changed then
          assert.equal("NEW-A001", device("A001").deviceKey)
          assert.equal("inactive", device("A001").status)
        else
          assert.equal("OLD-A001", device("A001").deviceKey)
        end
      end)

      it("workflow.replace inside nginx (cosocket transport): " .. render_cosocket(f), function()
        local x = f.cosocket or f.workflow
        local endpoint = f.endpoint and f.endpoint(env) or env.sim.url
        local primeable = endpoint:find(env.sim.url, 1, true) or endpoint:find("/f/", 1, true)
        -- a client in the worker with a token in hand, then the fault, then the workflow with that client
        local r = run_in_nginx(([[
          CLIENT = assert(require("enos").client { endpoint = %q, access_key = "fault-ak", secret_key = "fault-sk",
            org_id = %q, private_key_file = %q, timeout = 1, connect_timeout = 1 })
          local t = assert(CLIENT:transport())
          if %s then assert(CLIENT:get_device { assetId = "A002" }) end
          return { transport = getmetatable(t).__name }
        ]]):format(endpoint, ORG, env.kp.private_file, primeable and "true" or "false"))
        assert.equal("enos.transport.ngx", r.transport)
        if f.arm then f.arm(env, "workflow") end
        r = run_in_nginx([[
          local slept = 0
          local report, err = require("enos.workflow").replace(CLIENT, { assetId = "A001", newDeviceKey = "NEW-A001" },
            { settle_ms = 0, backoff_ms = 4, backoff_max_ms = 8, sleep = function(s) slept = slept + s * 1000 end })
          CLIENT:close()
          local e = report and report.error or err
          local out = { slept = slept, ok = report and report.ok or false,
            outcome = report and report.outcome or (err.report and err.report.outcome), secret = report and report.new.deviceSecret }
          if e then
            out.err = { kind = e.kind, code = e.code, status = e.status, refused = e.refused, aborted = e.aborted,
              verify_failed = e.verify_failed, deliver_failed = e.deliver_failed, secret_missing = e.secret_missing,
              field = e.field, message = tostring(e.message) }
          end
          return out
        ]])
        local exit = r.err and cli.exit_code(r.err) or 0
        assert.equal(x.exit, exit, r.err and r.err.message)
        assert.equal(x.ok, r.ok, r.err and r.err.message)
        assert.equal(x.outcome, r.outcome, r.err and r.err.message)
        if x.ok then
          assert.is_true(device("A001").deviceSecret == r.secret, "the secret delivered is the device's")
          if x.min_sleep_ms then assert.is_true(r.slept >= x.min_sleep_ms, "slept " .. r.slept .. " ms") end
        else
          assert.equal(x.kind, r.err.kind, r.err.message)
        end
        env.sim:admin("DELETE", "/faults")
        if x.changed then
          assert.equal("NEW-A001", device("A001").deviceKey)
        else
          assert.equal("OLD-A001", device("A001").deviceKey)
        end
      end)

      if not f.batch.special then
        it("batch.run: " .. render_batch(f.batch), function()
          local x = f.batch
          local rows = f.batch_rows or BATCH_ROWS
          local dir = H.tmpdir()
          local plan = dir .. "/plan.csv"
          local lines = { "assetId,newDeviceKey,site" }
          for i = 1, rows do lines[#lines + 1] = ("B%03d,NEW-B%03d,=1+2"):format(i, i) end
          H.writefile(plan, table.concat(lines, "\n") .. "\n")
          local c = client(f)
          if f.during then fault(env, { latency_ms = 100 }) end
          if f.arm then f.arm(env, "batch") end
          local state = {}
          local s, err = batch.run(c, plan, { concurrency = f.during and 2 or rows, out = dir .. "/creds.csv",
            journal = dir .. "/plan.journal", results = dir .. "/results.csv", settle_ms = 0, backoff_ms = 10,
            backoff_max_ms = 50, retry_attempts = 3, max_attempts = 2,
            progress = f.during and function(p) f.during(env, p, state) end or nil })
          c:close()
          assert.is_table(s, tostring(err))
          if f.during then assert.is_true(state.fired, "the fault fired mid-batch") end
          assert.equal(rows, s.total)
          assert.equal(x.done, s.done)
          assert.equal(x.failed, s.failed)
          if x.replaced then assert.equal(x.replaced, s.replaced) end
          if x.reconciled then assert.equal(x.reconciled, s.reconciled) end
          if x.retries then assert.is_true(s.retries >= x.retries, "retries " .. s.retries) end
          if x.failed > 0 then assert.equal(x.failed, s.failed_by_kind[x.kind]) end
          -- every row has a result line; every done row has its secret in the credentials file
          local results = {}
          for line in io.lines(dir .. "/results.csv") do results[#results + 1] = plan_mod.split_csv(line) end
          assert.equal(rows + 1, #results)
          local creds = {}
          for line in io.lines(dir .. "/creds.csv") do
            local cells = plan_mod.split_csv(line)
            creds[cells[2]] = cells
          end
          for i = 1, rows do
            local asset = ("B%03d"):format(i)
            local d = device(asset)
            if x.failed > 0 then
              assert.equal(("OLD-B%03d"):format(i), d.deviceKey)
            else
              assert.equal(("NEW-B%03d"):format(i), d.deviceKey)
              assert.is_table(creds[asset], "no credentials for " .. asset)
              assert.equal(d.deviceSecret, creds[asset][5])
              assert.equal("'=1+2", creds[asset][9])   -- carried, neutralised
            end
          end
          for i = 2, #results do
            assert.equal(x.failed > 0 and "failed" or (results[i][5] == "reconciled" and "reconciled" or "replaced"),
              results[i][5])
            if x.failed > 0 then assert.equal(x.kind, results[i][6]) end
          end
          assert.falsy(H.readfile(dir .. "/plan.journal"):find(device("B001").deviceSecret, 1, true))
          os.execute("rm -rf " .. dir)
        end)
      end
    end)
  end

  -- The token service goes down in the middle of a batch: nothing is lost, resume finishes.
  describe("token service outage mid-batch", function()
    local function plan_of(dir, rows)
      local lines = { "assetId,newDeviceKey" }
      for i = 1, rows do lines[#lines + 1] = ("B%03d,NEW-B%03d"):format(i, i) end
      H.writefile(dir .. "/plan.csv", table.concat(lines, "\n") .. "\n")
      return dir .. "/plan.csv"
    end
    local function run(dir, plan, count, resume)
      local c = assert(enos.client { endpoint = env.sim.url, access_key = "fault-ak", secret_key = "fault-sk",
        org_id = ORG, private_key_file = env.kp.private_file, timeout = 1 })
      local state = {}
      if not resume then fault(env, { latency_ms = 100 }) end
      local s, err = batch.run(c, plan, { concurrency = 2, out = dir .. "/creds.csv", journal = dir .. "/plan.journal",
        results = dir .. "/results.csv", settle_ms = 0, backoff_ms = 10, backoff_max_ms = 50, retry_attempts = 3,
        max_attempts = 2, resume = resume or nil,
        progress = count and function(p)
          if not state.fired and p.done >= 1 and p.done < p.total then
            state.fired = true
            expire(env)
            fault(env, { error_share = 1, error_status = 503, match = "token.get", count = count })
          end
        end or nil })
      c:close()
      assert.is_table(s, tostring(err))
      if count then assert.is_true(state.fired, "the outage began mid-batch") end
      return s
    end
    local function token_failures()
      local n = 0
      for _, e in ipairs(env.sim:log()) do if e.op == "token.get" and e.status == 503 then n = n + 1 end end
      return n
    end

    it("a short outage (2 failed token requests) is retried: every row done", function()
      local dir = H.tmpdir()
      local s = run(dir, plan_of(dir, 8), 2)
      assert.equal(2, token_failures())
      assert.equal(8, s.done)
      assert.equal(0, s.failed)
      for i = 1, 8 do assert.equal(("NEW-B%03d"):format(i), device(("B%03d"):format(i)).deviceKey) end
      os.execute("rm -rf " .. dir)
    end)

    it("a long outage fails the remaining rows as server errors, loses none; resume finishes each once", function()
      local dir = H.tmpdir()
      local plan = plan_of(dir, 8)
      local s = run(dir, plan, 1000)
      assert.equal(8, s.done + s.failed)
      assert.is_true(s.failed >= 1)
      for kind in pairs(s.failed_by_kind) do assert.equal("server", kind) end
      local n = 0
      for _ in io.lines(dir .. "/results.csv") do n = n + 1 end
      assert.equal(8 + 1, n)             -- every row recorded
      env.sim:admin("DELETE", "/faults")
      local s2 = run(dir, plan, nil, true)
      assert.equal(0, s2.failed)
      assert.equal(8, s2.done + s2.skipped)
      local creds = {}
      for line in io.lines(dir .. "/creds.csv") do
        local cells = plan_mod.split_csv(line)
        assert.is_nil(creds[cells[2]], "written twice: " .. cells[2])
        creds[cells[2]] = cells
      end
      local applied = {}
      for _, e in ipairs(env.sim:log()) do
        if e.op == "replaceDevice" and e.code == 0 then
          local q = core.parse_query(e.query or "") or {}
          -- (by assetId, or by productKey + the device's old key OLD-<asset>: the compare-and-swap form)
          local asset = q.assetId or (q.deviceKey or ""):match("^OLD%-(.*)$")
          applied[asset] = (applied[asset] or 0) + 1
        end
      end
      for i = 1, 8 do
        local asset = ("B%03d"):format(i)
        local d = device(asset)
        assert.equal(("NEW-B%03d"):format(i), d.deviceKey)
        assert.equal(1, applied[asset], asset .. " replaced " .. tostring(applied[asset]) .. " times")
        assert.is_table(creds[asset], "no credentials for " .. asset)
        assert.equal(d.deviceSecret, creds[asset][5])
      end
      os.execute("rm -rf " .. dir)
    end)
  end)

  for _, file in ipairs { "docs/faults.md", "README.md" } do
    it(file .. " carries this table", function()
      local doc = H.readfile(file)
      for _, f in ipairs(FAULTS) do
        local row = render_row(f)
        assert.truthy(doc:find(row, 1, true), file .. " lacks (or differs on) the row:\n" .. row)
      end
    end)
  end

  if os.getenv("ENOS_FAULTS_PRINT") then
    io.stderr:write("\n")
    for _, f in ipairs(FAULTS) do io.stderr:write(render_row(f), "\n") end
  end
end)
