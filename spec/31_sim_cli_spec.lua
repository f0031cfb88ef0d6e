-- bin/enos-sim as a user runs it: start (daemon) with a Lua config and flags, status, stop.
local sim = dofile("spec/sim_helper.lua")
local cjson = require "cjson"

local function sh(cmd)
  local p = io.popen(cmd .. " 2>&1; echo \"__rc=$?\"")
  local out = p:read("*a")
  p:close()
  local rc = tonumber(out:match("__rc=(%d+)%s*$"))
  return rc, (out:gsub("__rc=%d+%s*$", ""))
end

describe("bin/enos-sim", function()
  local bin = sim.root .. "/bin/enos-sim"

  it("starts with a config file and flags, reports status, and stops", function()
    local cfgf = os.tmpname() .. ".lua"
    local f = assert(io.open(cfgf, "w"))
    f:write([[return { orgs = { "o_cli_org" }, token_ttl = 60,
      devices = { { productKey = "pk_demo", deviceKey = "cli_dev", assetId = "CliAsset" } } }]])
    f:close()
    local rc, out = sh(bin .. " start --json --config " .. cfgf .. " --access-key cli-ak --secret-key cli-sk" ..
      " --seed-product pk_cli:Gateway --no-access-log")
    os.remove(cfgf)
    assert.equal(0, rc, out)
    local info = cjson.decode(out)
    finally(function() sh(bin .. " stop --clean --prefix " .. info.prefix) end)
    assert.matches("^http://127%.0%.0%.1:%d+$", info.url)
    assert.equal(info.url .. "/__sim", info.admin)
    assert.is_number(info.pid)

    local st, raw = sim.http { url = info.admin .. "/devices" }
    assert.equal(200, st)
    local devs = cjson.decode(raw).data
    assert.equal(1, #devs)
    assert.same({ "CliAsset", "o_cli_org" }, { devs[1].assetId, devs[1].orgId })

    -- the flags reached the config: a token for cli-ak, expiring within 60 s
    local h = sim.attach { url = info.url, admin_url = info.admin, prefix = info.prefix,
      app = { access_key = "cli-ak", secret_key = "cli-sk" } }
    local _, r = h:token_request("get")
    assert.equal(0, r.status)
    assert.is_true(r.data.expire <= 60)

    local src, sout = sh(bin .. " status --prefix " .. info.prefix)
    assert.equal(0, src)
    assert.matches("running=yes", sout)
    local stop_rc, stop_out = sh(bin .. " stop --prefix " .. info.prefix)
    assert.equal(0, stop_rc)
    assert.matches("stopped", stop_out)
    assert.is_false(require("enos.sim").alive(info.pid))
    src = sh(bin .. " status --prefix " .. info.prefix)
    assert.equal(3, src)
    stop_rc, stop_out = sh(bin .. " stop --prefix " .. info.prefix)
    assert.equal(0, stop_rc)
    assert.matches("not running", stop_out)
  end)

  it("explains a bad option", function()
    local rc, out = sh(bin .. " start --secret-scheme rsa_padding=rot13")
    assert.not_equal(0, rc)
    assert.matches("rsa_padding", out)
  end)
end)
