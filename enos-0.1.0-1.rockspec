rockspec_format = "3.0"
package = "enos"
version = "0.1.0-1"
-- The release tarball `make dist` writes (the checkout's files); `make dist` points this url at it and runs
-- `luarocks pack`, which makes the source rock (build/dist/enos-0.1.0-1.src.rock) that installs offline.
source = {
  url = "enos-0.1.0.tar.gz",
  dir = "enos-0.1.0",
}
description = {
  summary = "Replace IoT devices on Envision EnOS safely, fast and at fleet scale",
  detailed = [[
enos.core is a C module (libcurl + OpenSSL) for EnOS request signing, the API
gateway's token scheme, decryption of returned device secrets and HTTP
transports; enos is the Lua API on top (enos.client, enos.replace_device, ...).
]],
  license = "MIT",
  labels = { "enos", "iot", "envision", "libcurl", "openssl" },
}
-- Run-time dependencies. On Debian they come from the system (lua-cjson, lua-argparse), which LuaRocks
-- does not see: install the rock with --deps-mode none there (make check does).
dependencies = {
  "lua >= 5.1, < 5.5",
  "lua-cjson >= 2.1",
  "argparse >= 0.7",
}
-- Debian's curl header lives under a multiarch directory; LuaRocks 3.8's
-- header check cannot see it, so only the libraries are declared.
external_dependencies = {
  CURL = { library = "curl" },
  OPENSSL = { library = "ssl" },
}
-- Lua modules under lua/ are installed by the builtin backend as they are. The man page and the shell
-- completions (generated from the CLI by `make man`, kept in the repository) are copied into the rock's
-- directory (luarocks show --rock-dir enos).
build = {
  type = "builtin",
  copy_directories = { "man", "completions", "docs" },
  modules = {
    ["enos.core"] = {
      sources = { "src/core.c", "src/csv.c", "src/easy.c", "src/file.c", "src/http.c", "src/keyset.c", "src/multi.c",
                  "src/secret.c", "src/sign.c", "src/signals.c", "src/util.c", "src/worker.c" },
      libraries = { "curl", "ssl", "crypto", "pthread" },
      defines = { "_POSIX_C_SOURCE=200809L" },
      libdirs = { "$(CURL_LIBDIR)", "$(OPENSSL_LIBDIR)" },
    },
    -- the simulator's server code (what nginx runs), found by enos-sim where Lua finds these modules
    ["enos_sim.admin"] = "sim/enos_sim/admin.lua",
    ["enos_sim.auth"] = "sim/enos_sim/auth.lua",
    ["enos_sim.certs"] = "sim/enos_sim/certs.lua",
    ["enos_sim.conf"] = "sim/enos_sim/conf.lua",
    ["enos_sim.default_config"] = "sim/enos_sim/default_config.lua",
    ["enos_sim.devices"] = "sim/enos_sim/devices.lua",
    ["enos_sim.faults"] = "sim/enos_sim/faults.lua",
    ["enos_sim.nginx_conf"] = "sim/enos_sim/nginx_conf.lua",
    ["enos_sim.search"] = "sim/enos_sim/search.lua",
    ["enos_sim.secret"] = "sim/enos_sim/secret.lua",
    ["enos_sim.server"] = "sim/enos_sim/server.lua",
    ["enos_sim.store"] = "sim/enos_sim/store.lua",
    ["enos_sim.util"] = "sim/enos_sim/util.lua",
  },
  install = {
    bin = { ["enos-replace"] = "bin/enos-replace", ["enos-sim"] = "bin/enos-sim" },
  },
}
