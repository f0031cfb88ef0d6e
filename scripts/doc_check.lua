-- Every public function of the documented modules has a doc comment (`make docs` runs this after LDoc).
--
-- usage: lua5.4 scripts/doc_check.lua [--list] [FILE...]
--   no FILE: the files config.ld gives LDoc (its `file` list less its `exclude` list, directories searched for
--   *.lua), read from the checkout this script is in. --list prints the files it would check, and checks none.
--
-- Public, in a module: every function defined at the top of the file on a table, not a local:
-- `function M.name(`, `function M:name(`, `function Client:name(`, `function M.Reader:name(`, `M.name = function(`
-- (M being whatever the file returns; Client any table the module defines methods on), and every other
-- field of the returned table (`M.OPTIONS = {`, `M.MAX = 64`, `M.alias = local_fn`). A name that starts with
-- `_` is private (`_call`, `__index`); a `local function` and a function nested in another are not looked at.
-- Documented: the comment lines right above the definition (no blank line between) start with `---`.
-- Prints `file:line: public function NAME has no doc comment` (or `public field`) for each one that is not
-- documented, and exits 1 when there is any; exits 2 when a file cannot be read.

local root = ((arg and arg[0] or ""):match("^(.*)/[^/]*$") or ".") .. "/.."     -- the checkout: scripts/..

local function fail(msg)
  io.stderr:write("doc_check: ", msg, "\n")
  os.exit(2)
end

local function read(path)
  local f, err = io.open(path, "rb")
  if not f then fail(err) end
  local s = f:read("a")
  f:close()
  return s
end

-- config.ld is Lua: run it in an empty environment and take its `file` table.
local function config_files()
  local env = {}
  local chunk, err = load(read(root .. "/config.ld"), "config.ld", "t", env)
  if not chunk then fail(err) end
  local ok, rerr = pcall(chunk)
  if not ok then fail("config.ld: " .. tostring(rerr)) end
  local list = env.file
  if type(list) == "string" then list = { list } end
  if type(list) ~= "table" then fail("config.ld has no `file` list") end
  return list, list.exclude or {}
end

local function shell_quote(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

-- A file as itself; a directory as the *.lua files under it, sorted (no lfs: find, as LDoc's lists go).
local function expand(path)
  local full = root .. "/" .. path
  local p = io.popen("find " .. shell_quote(full) .. " -type f -name '*.lua' 2>/dev/null | LC_ALL=C sort")
  local out = p and p:read("a") or ""
  if p then p:close() end
  local files = {}
  for line in out:gmatch("[^\n]+") do
    files[#files + 1] = path .. line:sub(#full + 1)
  end
  if #files == 0 then fail("config.ld names " .. path .. ": no such file or no .lua file under it") end
  return files
end

local function default_files()
  local list, exclude = config_files()
  local skip = {}
  for _, path in ipairs(exclude) do
    for _, f in ipairs(expand(path)) do skip[f] = true end
  end
  local files, seen = {}, {}
  for _, path in ipairs(list) do
    for _, f in ipairs(expand(path)) do
      if not skip[f] and not seen[f] then
        seen[f] = true
        files[#files + 1] = f
      end
    end
  end
  return files, root .. "/"
end

local function split_lines(text)
  local lines = {}
  for line in (text:gsub("\r\n", "\n") .. "\n"):gmatch("([^\n]*)\n") do lines[#lines + 1] = line end
  return lines
end

-- The table the file returns: its last top-level `return NAME`.
local function module_table(lines)
  for i = #lines, 1, -1 do
    local name = lines[i]:match("^return%s+([%a_][%w_]*)%s*$")
    if name then return name end
  end
end

-- Whether the comment group right above line i starts with `---`.
local function documented(lines, i)
  local first
  local j = i - 1
  while j >= 1 and lines[j]:match("^%s*%-%-") do
    first = j
    j = j - 1
  end
  return first ~= nil and lines[first]:match("^%s*%-%-%-") ~= nil
end

-- The public definitions of a file: {line, kind ("function" or "field"), name}.
local function definitions(lines)
  local mod = module_table(lines)
  local defs = {}
  for i, line in ipairs(lines) do
    local path, sep, name = line:match("^function%s+([%a_][%w_.]*)([.:])([%a_][%w_]*)%s*%(")
    local kind = path and "function"
    if not path then
      path, name = line:match("^([%a_][%w_.]*)%.([%a_][%w_]*)%s*=%s*function[%s(]")
      sep, kind = ".", path and "function"
    end
    if not path and mod then
      path, name = line:match("^(" .. mod .. ")%.([%a_][%w_]*)%s*=[^=]")
      sep, kind = ".", path and "field"
    end
    if path and name:sub(1, 1) ~= "_" then
      defs[#defs + 1] = { line = i, kind = kind, name = path .. sep .. name }
    end
  end
  return defs
end

local args, list_only = {}, false
for i = 1, arg and #arg or 0 do
  if arg[i] == "--list" then list_only = true else args[#args + 1] = arg[i] end
end
local files, prefix = args, ""
if #files == 0 then files, prefix = default_files() end
if list_only then
  for _, file in ipairs(files) do io.stdout:write(file, "\n") end
  os.exit(0)
end

local missing = 0
for _, file in ipairs(files) do
  local lines = split_lines(read(prefix .. file))
  for _, d in ipairs(definitions(lines)) do
    if not documented(lines, d.line) then
      missing = missing + 1
      io.stdout:write(("%s:%d: public %s %s has no doc comment\n"):format(file, d.line, d.kind, d.name))
    end
  end
end
if missing > 0 then
  io.stdout:write(("doc_check: %d public definition%s without a doc comment in %d file%s\n"):format(
    missing, missing == 1 and "" or "s", #files, #files == 1 and "" or "s"))
  os.exit(1)
end
io.stdout:write(("doc_check: every public function and field of %d file%s has a doc comment\n"):format(
  #files, #files == 1 and "" or "s"))
