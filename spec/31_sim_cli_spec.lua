-- bin/enos-sim as a user runs it: start (daemon) with a Lua config and flags, status, stop.
local sim = dofile("spec/sim_helper.lua")
local cjson = require "cjson"
local H = require "helpers"

local function sh(cmd)
  local p = io.popen(cmd .. " 2>&1; echo \"__rc=$?\"")
  local out = p:read("*a")
  p:close()
  local rc = tonumber(out:match("__rc=(%d+)%s*$"))
  return rc, (out:gsub("__rc=%d+%s*$", ""))
end

describe("bin/enos-sim", function()
  local bin = sim.root .. "/bin/enos-sim"

  it("--version names enos-sim's version, nginx's and Lua's", function()
    local rc, out = sh(bin .. " --version")
    assert.equal(0, rc, out)
    assert.matches("^enos%-sim %d+%.%d+%.%d+\nnginx: nginx/%d", out)
    assert.matches("\nLua: Lua 5%.%d\n$", out)
  end)

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

  it("stop trusts no planted state: not a shared state directory, not a process or directory that is not its own", function()
    local base = os.tmpname()
    os.remove(base)
    assert(os.execute("mkdir -p " .. base))
    local uid = (io.popen("id -u"):read("*l"))
    local state = base .. "/enos-sim-" .. uid
    local env = "XDG_RUNTIME_DIR=" .. base .. " "
    -- a victim process and a victim directory
    local victim = io.popen("sleep 30 & echo $!"):read("*l")
    local vdir = base .. "/precious"
    assert(os.execute("mkdir -p " .. vdir .. "/logs " .. vdir .. "/conf && echo keep > " .. vdir .. "/data && " ..
      "echo " .. victim .. " > " .. vdir .. "/logs/nginx.pid && : > " .. vdir .. "/conf/nginx.conf"))
    -- 1. a state directory others can write to is not trusted at all
    assert(os.execute("mkdir -m 777 " .. state .. " && chmod 777 " .. state))
    H.writefile(state .. "/last", vdir .. "\n")
    local rc, out = sh(env .. bin .. " stop --clean")
    assert.equal(2, rc, out)
    assert.matches("not a private directory", out, 1, true)
    -- 2. a private one naming a directory whose pid file names another process: not signalled, not removed
    assert(os.execute("chmod 700 " .. state))
    rc, out = sh(env .. bin .. " stop --clean")
    assert.equal(1, rc, out)
    assert.matches("is not the nginx master of", out, 1, true)
    assert.is_true(os.execute("kill -0 " .. victim) == true or os.execute("kill -0 " .. victim) == 0)
    -- 3. no process: --clean still keeps a directory the launcher did not make
    assert(os.execute("kill " .. victim))
    os.execute("sleep 0.2")
    rc, out = sh(env .. bin .. " stop --clean")
    assert.equal(0, rc, out)
    assert.matches("kept: not a simulator prefix", out, 1, true)
    assert.equal("keep\n", H.readfile(vdir .. "/data"))
    os.execute("rm -rf " .. base)
  end)
end)
