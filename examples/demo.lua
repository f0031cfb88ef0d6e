#!/usr/bin/env lua5.4
-- make demo: replace a device end to end against the local simulator (TLS,
-- a generated application key pair), prove the new triple logs in and the old
-- one is refused, and leave nothing running. Exits non-zero if any step fails.
local here = (arg and arg[0] or ""):match("^(.*)/examples/[^/]*$") or "."
package.path = here .. "/lua/?.lua;" .. here .. "/lua/?/init.lua;" .. package.path
local abi = (type(jit) == "table") and "luajit" or "lua5.4"
package.cpath = here .. "/build/" .. abi .. "/?.so;" .. package.cpath

local enos = require "enos"
local sim = require "enos.sim"
local core = require "enos.core"
local cjson = require "cjson"

local tty = os.getenv("NO_COLOR") == nil and os.execute("test -t 1") == true
local function c(code, s) return tty and ("\27[" .. code .. "m" .. s .. "\27[0m") or s end
local function step(s) io.write(c("1", "▸ "), s, "\n") end
local function ok(s) io.write("  ", c("32", "✓ "), s, "\n") end

local function mask(secret)
  if not secret then return "(none)" end
  return secret:sub(1, 2) .. string.rep("•", #secret - 4) .. secret:sub(-2)
end

local function sh(cmd)
  local p = assert(io.popen("{ " .. cmd .. "; } 2>&1"))
  local out = p:read("*a")
  local success = p:close()
  if not success then error("command failed: " .. cmd .. "\n" .. out, 0) end
  return out
end

local info                       -- the running simulator, stopped whatever happens
local workdir

local function main()
  local t0 = core.monotonic_ms()
  workdir = sh("mktemp -d /tmp/enos-demo.XXXXXX"):gsub("%s+$", "")
  local priv, pub = workdir .. "/app_private.pem", workdir .. "/app_public.pem"

  step("Generating the application's RSA key pair (the console's download, here made locally)")
  sh(("umask 077; openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out %s && openssl pkey -in %s -pubout -out %s")
    :format(priv, priv, pub))
  ok("private key " .. priv)

  step("Starting enos-sim over TLS with one product and one online device")
  local err
  info, err = sim.start {
    tls = true, access_log = false,
    config = {
      apps = { { access_key = "demo-access-key", secret_key = "demo-secret-key-0123456789", public_key_file = pub } },
      devices = { { productKey = "pk_demo", deviceKey = "INV-2231-A", deviceName = { defaultValue = "Inverter 2231" },
        status = "online", deviceSecret = "OldSecretOldSecret01" } },
    },
  }
  if not info then error(err, 0) end
  ok(("simulator at %s (CA %s)"):format(info.url, info.ca_file))
  local seeded = info.config.devices[1]

  local client = assert(enos.client {
    endpoint = info.url, access_key = "demo-access-key", secret_key = "demo-secret-key-0123456789",
    org_id = info.config.orgs[1], private_key_file = priv, cafile = info.ca_file, timeout = 10,
  })

  step("Reading the device before the swap")
  local before = assert(client:get_device { productKey = "pk_demo", deviceKey = "INV-2231-A" })
  ok(("%s  key %s  status %s"):format(before.assetId, before.deviceKey, before.status))

  step("Replacing it with the CLI: enos-replace device --asset-id " .. before.assetId .. " --new-key INV-2231-B")
  local record_file = workdir .. "/INV-2231-B.json"
  local env = ("ENOS_ENDPOINT=%s ENOS_ACCESS_KEY=demo-access-key ENOS_SECRET_KEY=demo-secret-key-0123456789 "
    .. "ENOS_ORG_ID=%s ENOS_PRIVATE_KEY_FILE=%s ENOS_CA_FILE=%s ENOS_CONFIG=/nonexistent")
    :format(info.url, info.config.orgs[1], priv, info.ca_file)
  local p = assert(io.popen(("%s %s/bin/enos-replace device --asset-id %s --new-key INV-2231-B --out %s --yes 2>&1")
    :format(env, here, before.assetId, record_file)))
  local cli_out = p:read("*a")
  local cli_ok = p:close()
  io.write((cli_out:gsub("[^\n]+", "    %0")))
  if not cli_ok then error("enos-replace failed", 0) end
  local f = assert(io.open(record_file, "rb"))
  local r = cjson.decode(f:read("*a"))
  f:close()
  ok("provisioning record written to " .. record_file .. " (mode 0600)")

  step("Verifying on the platform")
  local after = assert(client:get_device { assetId = before.assetId })
  assert(after.deviceKey == "INV-2231-B", "the platform still shows key " .. tostring(after.deviceKey))
  assert(after.assetId == before.assetId, "assetId changed")
  assert(after.status == "inactive", "status is " .. tostring(after.status) .. ", expected inactive")
  ok("key is INV-2231-B, assetId kept, status inactive")

  step("Proving the credentials on the device login endpoint")
  local t = core.easy { cafile = info.ca_file, timeout = 10 }
  local function login(dk, secret)
    local ts = string.format("%d", core.now_ms())
    local client_id = "demo-" .. dk
    local sign = enos.sha256_hex("clientId" .. client_id .. "deviceKey" .. dk .. "productKey" .. "pk_demo"
      .. "timestamp" .. ts .. secret):upper()
    local res, terr = t:send { method = "POST", url = info.url .. "/device/login",
      headers = { ["Content-Type"] = "application/json" },
      body = cjson.encode { productKey = "pk_demo", deviceKey = dk, clientId = client_id, timestamp = ts, sign = sign } }
    if not res then error("login request failed: " .. tostring(terr.message), 0) end
    return res.status == 200 and (cjson.decode(res.body) or {}).code == 0
  end
  assert(login("INV-2231-B", r.deviceSecret), "the new triple was refused")
  ok("new hardware (INV-2231-B + new secret) logs in")
  assert(not login("INV-2231-A", seeded.deviceSecret), "the old triple still logs in")
  ok("old hardware (INV-2231-A + old secret) is refused")
  t:close()

  step("Watching the replaced device come online (enos.fleet.watch: one Search Device a poll)")
  local w = assert(enos.fleet.watch(client, { { assetId = before.assetId } }, { interval = 1, timeout = 30 }))
  assert(w.outcome == "online", "the new unit is not online")
  ok(("%d/%d online after %d poll(s), %d call(s)"):format(w.online, w.total, w.polls, w.calls))
  local online = assert(client:get_device { assetId = before.assetId })
  client:close()

  io.write("\n", c("1", "Device replaced"), string.format(" in %.1f s\n", (core.monotonic_ms() - t0) / 1000))
  io.write(("  asset      %s (kept)\n"):format(r.assetId))
  io.write(("  device key %s → %s\n"):format(before.deviceKey, r.deviceKey))
  io.write(("  status     %s → inactive after the replace → %s after the new unit's login\n")
    :format(before.status, online.status))
  io.write(("  new secret %s (decrypted with the application's private key; shown masked)\n"):format(mask(r.deviceSecret)))
end

local success, failure = xpcall(main, function(e) return e end)
if info then sim.stop(info.prefix, { clean = true }) end
if workdir then os.execute("rm -rf " .. workdir) end
if sim.alive(info and info.pid or -1) then
  io.stderr:write("demo: the simulator is still running (pid ", tostring(info.pid), ")\n")
  os.exit(1)
end
if not success then
  io.stderr:write(c("31", "demo failed: "), tostring(failure), "\n")
  os.exit(1)
end
io.write("  simulator stopped; nothing left running\n")
