-- The benches' module paths: this checkout's lua/ and its build for the running Lua (5.4 or LuaJIT).
-- usage: local here = dofile((arg[0]:match("^(.*)/[^/]*$") or ".") .. "/paths.lua")   (here: the checkout)
local here = ((arg[0]:match("^(.*)/bench/[^/]*$")) or ".")
package.path = here .. "/lua/?.lua;" .. here .. "/lua/?/init.lua;" .. package.path
package.cpath = here .. "/build/" .. (type(jit) == "table" and "luajit" or "lua5.4") .. "/?.so;" .. package.cpath
return here
