-- The README's examples run as pasted: the shell walkthrough ("Try it against the simulator") and the Lua
-- quick example, against a simulator started the way the README says. Run from a scratch directory whose
-- bin/, lua/ and build/ are the checkout's, so the files they write stay out of the checkout.
local H = require "helpers"

local function block(readme, after, lang)
  local from = assert(readme:find(after, 1, true), "README has no " .. after)
  local a = assert(readme:find("```" .. lang .. "\n", from, true))
  local b = assert(readme:find("\n```", a + 4, true))
  return readme:sub(a + #lang + 4, b)
end

describe("README", function()
  local repo, dir, readme
  setup(function()
    repo = H.sh("pwd"):gsub("%s+$", "")
    dir = H.tmpdir()
    for _, d in ipairs { "bin", "lua", "build" } do H.sh(("ln -s %s/%s %s/%s"):format(repo, d, dir, d)) end
    readme = H.readfile(repo .. "/README.md")
  end)
  teardown(function()
    pcall(H.sh, "cd " .. dir .. " && HOME=" .. dir .. " bin/enos-sim stop --clean")
    H.sh("rm -rf " .. dir)
  end)

  local function run(script)
    H.writefile(dir .. "/run.sh", "set -e\ncd " .. dir .. "\nexport HOME=" .. dir .. " TMPDIR=" .. dir .. "\n" ..
      "unset ENOS_CONFIG ENOS_PROFILE XDG_CONFIG_HOME\n" ..
      -- (a step that fails must not leave the simulator running)
      "trap 'bin/enos-sim stop --clean >/dev/null 2>&1 || true' EXIT\n" .. script)
    return H.sh("bash " .. dir .. "/run.sh")
  end

  it("the walkthrough against the simulator runs as pasted", function()
    local sh = block(readme, "## Try it against the simulator", "sh")
    local out = run(sh)
    assert.truthy(out:find("Replaced: asset", 1, true), out)
    local creds = H.readfile(dir .. "/creds.csv")
    local n = 0
    for _ in creds:gmatch("[^\n]+") do n = n + 1 end
    assert.equal(3, n, creds)                                    -- the header and two devices
    assert.truthy(creds:find("INV-2-B", 1, true))
    assert.truthy(H.readfile(dir .. "/inv1.json"):find('"deviceSecret"', 1, true))
  end)

  it("the Lua quick example runs as pasted, with the settings enos-sim start exports", function()
    H.writefile(dir .. "/example.lua", block(readme, "## Quick example", "lua"))
    local out = run([[
eval "$(bin/enos-sim start --tls)"
curl -s --cacert "$ca" -H 'Content-Type: application/json' "$admin/devices" \
  -d '[{"productKey":"pk_demo","deviceKey":"INV-0-A"},{"productKey":"pk_demo","deviceKey":"INV-9-A"}]' >/dev/null
LUA_PATH="lua/?.lua;lua/?/init.lua;;" LUA_CPATH="build/lua5.4/?.so;;" lua5.4 example.lua 2>&1
bin/enos-sim stop --clean >/dev/null
]])
    assert.truthy(out:find("pk_demo\tINV%-0%-B"), out)
    assert.truthy(out:find("INV-9-B\tsecret in hand", 1, true), out)
  end)
end)
