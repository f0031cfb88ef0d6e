std = "max"
max_line_length = 150
codes = true
files["spec"] = { std = "+busted" }
files["sim"] = { globals = { "ngx" } }
files["lua/enos/transport/ngx.lua"] = { globals = { "ngx" } }
files["examples/nginx"] = { globals = { "ngx" } }
exclude_files = { "build/**", "luarocks-tree/**" }
