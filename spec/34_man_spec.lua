-- The man page and the shell completions of enos-replace: made from the CLI's own definitions
-- (scripts/generate.lua, `make man`), kept in the repository for the rock and `make install`. They must be
-- what the CLI would generate now, name every option --help names, and be valid for their readers.
local H = require "helpers"
local cli = require "enos.cli"

local function run(argv)
  local o = {}
  local code = cli.main { argv = argv, env = {}, stdout = function(s) o[#o + 1] = s end,
    stderr = function(s) o[#o + 1] = s end }
  return code, table.concat(o)
end

local function sh(cmd)
  local p = io.popen(cmd .. " 2>&1; echo \"__rc=$?\"")
  local out = p:read("*a")
  p:close()
  return tonumber(out:match("__rc=(%d+)%s*$")), (out:gsub("__rc=%d+%s*$", ""))
end

describe("man page and completions", function()
  local gen = dofile("scripts/generate.lua")
  local files = gen.files()

  it("are what `make man` would write now (run it after changing an option or a help text)", function()
    local n = 0
    for path, text in pairs(files) do
      n = n + 1
      local have = H.readfile(path)
      assert.is_true(have == text, path .. " is out of date with the CLI: run `make man`")
    end
    assert.equal(4, n)
  end)

  it("the man page names every command and every option that --help names", function()
    local man = files["man/enos-replace.1"]
    local _, main = run { "--help" }
    for _, cmd in ipairs { "device", "batch", "watch", "get", "config", "help", "completion" } do
      assert.matches("\n   " .. cmd .. " ", main, 1, true)
      local code, help = run { cmd, "--help" }
      assert.equal(0, code, help)
      local seen = 0
      for opt in help:gmatch("%s(%-%-[%w%-]+)") do
        seen = seen + 1
        -- groff escapes the minus signs of options: \-\-name
        assert.truthy(man:find((opt:gsub("%-", "\\-")), 1, true) or man:find(opt, 1, true),
          cmd .. " " .. opt .. " is not in the man page")
      end
      assert.is_true(seen >= 1, cmd)
    end
    for _, var in ipairs { "ENOS_ENDPOINT", "ENOS_ACCESS_KEY", "ENOS_SECRET_KEY", "ENOS_ORG_ID",
        "ENOS_PRIVATE_KEY_FILE", "ENOS_CA_FILE", "ENOS_CONFIG", "ENOS_PROFILE", "ENOS_TIMEOUT", "ENOS_API_VERSION" } do
      assert.truthy(man:find(var, 1, true), var .. " is not in the man page")
    end
  end)

  it("the man page formats without a groff warning", function()
    local rc, out = sh("groff -man -ww -z man/enos-replace.1")
    assert.equal(0, rc, out)
    assert.equal("", out)
  end)

  it("the bash completion parses and completes commands and a command's options", function()
    local rc, out = sh([[bash -c 'source completions/enos-replace.bash
      COMP_WORDS=(enos-replace ba); COMP_CWORD=1; _enos-replace; echo "[${COMPREPLY[*]}]"
      COMP_WORDS=(enos-replace batch --resum); COMP_CWORD=2; _enos-replace; echo "[${COMPREPLY[*]}]"']])
    assert.equal(0, rc, out)
    assert.matches("%[batch%]", out)
    assert.matches("%[%-%-resume%]", out)
  end)

  it("enos-replace completion prints the same scripts", function()
    for _, shell in ipairs { "bash", "zsh", "fish" } do
      local code, out = run { "completion", shell }
      assert.equal(0, code, out)
      assert.equal(files["completions/enos-replace." .. shell], out)
    end
    local code, out = run { "completion", "tcsh" }
    assert.equal(2, code)
    assert.matches("must be one of 'bash', 'zsh', 'fish'", out, 1, true)
  end)
end)
