rockspec_format = "3.0"
package = "enos"
version = "0.1.0-1"
source = {
  url = "git+file:///enos",
  tag = "v0.1.0",
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
-- lua-cjson and lua-argparse (for the commands) are needed at run time; they come
-- from the system (Debian's lua-cjson, lua-argparse), which LuaRocks cannot see
-- offline, so they are not listed here.
dependencies = {
  "lua >= 5.1, < 5.5",
}
-- Debian's curl header lives under a multiarch directory; LuaRocks 3.8's
-- header check cannot see it, so only the libraries are declared.
external_dependencies = {
  CURL = { library = "curl" },
  OPENSSL = { library = "ssl" },
}
-- Lua modules under lua/ are installed by the builtin backend as they are.
build = {
  type = "builtin",
  modules = {
    ["enos.core"] = {
      sources = { "src/core.c", "src/csv.c", "src/easy.c", "src/file.c", "src/http.c", "src/keyset.c", "src/multi.c",
                  "src/secret.c", "src/sign.c", "src/signals.c", "src/util.c", "src/worker.c" },
      libraries = { "curl", "ssl", "crypto", "pthread" },
      defines = { "_POSIX_C_SOURCE=200809L" },
      libdirs = { "$(CURL_LIBDIR)", "$(OPENSSL_LIBDIR)" },
    },
  },
  install = {
    bin = { ["enos-replace"] = "bin/enos-replace", ["enos-sim"] = "bin/enos-sim" },
  },
}
