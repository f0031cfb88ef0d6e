-- The API reference: every public function of the documented modules has a doc comment (scripts/doc_check.lua,
-- over the files config.ld lists), the checker does catch a missing one, and LDoc builds the reference from
-- config.ld without an error or a warning (`make docs`). LDoc missing is a failure here, not a skip.
local H = require "helpers"

-- Runs a command: its output (stdout and stderr) and its exit code (read from the shell: LuaJIT's
-- popen:close gives none).
local function run(cmd)
  local p = assert(io.popen("(" .. cmd .. ") 2>&1; echo \"__rc=$?\""))
  local out = p:read("*a")
  p:close()
  local rc = tonumber(out:match("__rc=(%d+)%s*$"))
  return (out:gsub("__rc=%d+%s*$", "")), rc
end

local FIXTURE = [[
--- A fixture module.
-- @module fixture
local enos = {}

local Thing = {}
Thing.__index = Thing

--- Documented.
function enos.documented(a) return a end

function enos.bare(a) return a end

-- A plain comment is not a doc comment.
function enos.plain() end

--- A blank line parts a comment from what follows.

function enos.parted() end

--- Documented, as a field set to a function.
enos.assigned = function() end

enos.undocumented_assigned = function() end

enos.LIMIT = 10

--- Documented.
enos.DOCUMENTED_LIMIT = 10

--- Documented method.
function Thing:documented() end

function Thing:bare_method() end

function Thing._private() end
function enos._private() end
function Thing.__tostring() return "thing" end

local function helper() end

--- Documented.
function enos.new()
  local t = setmetatable({}, Thing)
  function t.nested() end          -- inside a function: not the module's
  t.also_nested = function() return helper end
  return t
end

return enos
]]

describe("API docs", function()
  local repo, dir
  setup(function()
    repo = H.sh("pwd"):gsub("%s+$", "")
    dir = H.tmpdir()
  end)
  teardown(function()
    if dir then os.execute("rm -rf " .. dir) end
  end)

  it("every public function of the documented modules has a doc comment", function()
    local out, rc = run("lua5.4 " .. repo .. "/scripts/doc_check.lua")
    assert.equal(0, rc, out)
    assert.matches("every public function and field of %d+ files has a doc comment", out)
  end)

  it("checks the files config.ld gives LDoc: the library, not the CLI's internals", function()
    local out, rc = run("lua5.4 " .. repo .. "/scripts/doc_check.lua --list")
    assert.equal(0, rc, out)
    local files = {}
    for line in out:gmatch("[^\n]+") do files[line] = true end
    for _, f in ipairs { "lua/enos/init.lua", "lua/enos/client.lua", "lua/enos/workflow.lua", "lua/enos/batch.lua",
      "lua/enos/batch/gate.lua", "lua/enos/transport/curl.lua", "lua/enos/sim/init.lua" } do
      assert.truthy(files[f], f .. " is not checked:\n" .. out)
    end
    assert.is_nil(files["lua/enos/cli/init.lua"])
    assert.is_nil(files["lua/enos/sim/config.lua"])
  end)

  it("fails on a real module whose doc comment was stripped, naming the function", function()
    local src = H.readfile(repo .. "/lua/enos/json.lua")
    local stripped, n = src:gsub("\n%-%-%- Decodes s;[^\n]*\n", "\n")
    assert.equal(1, n, "lua/enos/json.lua no longer documents M.decode as the test expects")
    local lineno = select(2, stripped:sub(1, stripped:find("function M.decode(", 1, true)):gsub("\n", "")) + 1
    H.writefile(dir .. "/json.lua", stripped)
    local out, rc = run("lua5.4 " .. repo .. "/scripts/doc_check.lua " .. dir .. "/json.lua")
    assert.equal(1, rc, out)
    assert.truthy(out:find(dir .. "/json.lua:" .. lineno .. ": public function M.decode has no doc comment", 1, true),
      out)
    assert.equal(1, select(2, out:gsub("has no doc comment", "")), out)   -- the other functions still pass
    -- and the module as it is passes
    out, rc = run("lua5.4 " .. repo .. "/scripts/doc_check.lua " .. repo .. "/lua/enos/json.lua")
    assert.equal(0, rc, out)
  end)

  it("knows the forms of a public definition, and what is not one", function()
    H.writefile(dir .. "/fixture.lua", FIXTURE)
    local out, rc = run("lua5.4 " .. repo .. "/scripts/doc_check.lua " .. dir .. "/fixture.lua")
    assert.equal(1, rc, out)
    local named = {}
    for name in out:gmatch("public %a+ ([%w_.:]+) has no doc comment") do named[#named + 1] = name end
    table.sort(named)
    assert.same({ "Thing:bare_method", "enos.LIMIT", "enos.bare", "enos.parted", "enos.plain",
      "enos.undocumented_assigned" }, named)
    assert.truthy(out:find("public field enos.LIMIT", 1, true), out)
    assert.truthy(out:find("public function enos.undocumented_assigned", 1, true), out)
  end)

  it("ldoc builds the reference from config.ld, without a warning", function()
    local out, rc = run("cd " .. repo .. " && ldoc -c config.ld -d " .. dir .. "/html .")
    assert.equal(0, rc, out)
    local warnings = {}
    for line in out:gmatch("[^\n]+") do
      if not (line:find("^reading configuration from ") or line:find("^output written to ")) then
        warnings[#warnings + 1] = line
      end
    end
    assert.same({}, warnings)
    local index = H.readfile(dir .. "/html/index.html")
    assert.truthy(index:find('href="modules/enos.html"', 1, true), "index.html lists no module enos")
    assert.truthy(index:find('href="modules/enos.workflow.html"', 1, true))
    assert.is_nil(index:find('href="modules/enos.cli.', 1, true))          -- the command's internals are not API
    local enos = H.readfile(dir .. "/html/modules/enos.html")
    assert.truthy(enos:find('name = "replace_device"', 1, true), "enos.html does not document replace_device")
    local client = H.readfile(dir .. "/html/modules/enos.client.html")
    assert.truthy(client:find("Client:replace_device", 1, true))
  end)
end)
