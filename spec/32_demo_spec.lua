-- make demo's script: the main job end to end, leaving nothing running.
local H = require "helpers"

describe("make demo", function()
  it("replaces a device, proves the new triple and the refusal of the old one, and stops the simulator", function()
    local p = assert(io.popen("NO_COLOR=1 lua5.4 examples/demo.lua 2>&1; echo \"exit=$?\""))
    local out = p:read("*a")
    p:close()
    assert.matches("exit=0", out, 1, true)
    assert.matches("device key INV%-2231%-A → INV%-2231%-B", out)
    assert.matches("new hardware %(INV%-2231%-B %+ new secret%) logs in", out)
    assert.matches("old hardware %(INV%-2231%-A %+ old secret%) is refused", out)
    assert.matches("1/1 online after 1 poll%(s%), 1 call%(s%)", out)
    assert.matches("status     online → inactive", out)
    assert.matches("nothing left running", out)
    local prefix = out:match("CA (/tmp/enos%-sim%.[%w]+)/conf/ca%.pem")
    assert.is_string(prefix)
    -- the simulator's nginx is gone
    -- ("[n]ginx" keeps pgrep from matching its own command line)
    local running = H.sh("pgrep -f '[n]ginx.*" .. prefix .. "' || true")
    assert.equal("", running)
    -- and its prefix directory (config, CA key, logs) is removed
    assert.is_nil(io.open(prefix .. "/conf/nginx.conf"), "the simulator's prefix was left behind")
    -- the masked secret is all the demo shows of it
    assert.matches("new secret %w%w\226\128\162[^ ]*%w%w %(decrypted", out)
  end)
end)
