-- Writes the files made from the CLI's own definitions, kept in the repository so that a rock (which runs no
-- build step of ours) ships them: man/enos-replace.1 and completions/enos-replace.{bash,zsh,fish}.
-- `make man` runs it; spec 34 fails when they differ from what this would write now.
-- usage: lua5.4 scripts/generate.lua [DIR]   (DIR: where man/ and completions/ go; default: the checkout)
local as_script = not pcall(debug.getlocal, 4, 1)      -- (not required or dofile'd by a spec)
if as_script then
  local abi = (type(jit) == "table") and "luajit" or ("lua" .. _VERSION:match("%d+%.%d+"))
  package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
  package.cpath = "build/" .. abi .. "/?.so;" .. package.cpath
end
local dir = arg and arg[1] or "."

local function write(path, text)
  local f = assert(io.open(dir .. "/" .. path, "wb"))
  f:write(text)
  f:close()
end

local M = {}

--- The generated files: {path → text}.
function M.files()
  local cli = require "enos.cli"
  local parser = cli.parser()
  return {
    ["man/enos-replace.1"] = require("enos.cli.man").render(),
    ["completions/enos-replace.bash"] = parser:get_bash_complete(),
    ["completions/enos-replace.zsh"] = parser:get_zsh_complete(),
    ["completions/enos-replace.fish"] = parser:get_fish_complete(),
  }
end

if as_script then
  for path, text in pairs(M.files()) do write(path, text) end
end
return M
