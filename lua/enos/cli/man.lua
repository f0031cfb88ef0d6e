--- The man page of enos-replace, made from the CLI's own help texts (so the two cannot drift apart):
-- `lua5.4 -e 'io.write(require("enos.cli.man").render())' > enos-replace.1` (make man does it).
-- @module enos.cli.man
local cli = require "enos.cli"
local enos = require "enos"

local M = {}

-- Text as troff shows it verbatim: backslashes doubled, a leading dot or quote made harmless.
local function roff(text)
  text = text:gsub("\\", "\\e")
  text = text:gsub("\n([.'])", "\n\\&%1"):gsub("^([.'])", "\\&%1")
  return text
end

local function block(text)
  return ".nf\n" .. roff(text) .. "\n.fi\n"
end

M.ORDER = { "device", "batch", "watch", "audit", "get", "config", "help", "completion" }

--- The man page (troff, section 1).
-- @treturn string
function M.render()
  local parser, cmds = cli.parser()
  local out = {}
  local function add(s) out[#out + 1] = s end
  add(('.TH ENOS-REPLACE 1 "" "enos %s" "User Commands"\n'):format(enos._VERSION))
  add(".SH NAME\nenos-replace \\- replace the device key of Envision EnOS devices (hardware swaps), safely\n")
  add(".SH SYNOPSIS\n")
  for _, name in ipairs(M.ORDER) do add(".B enos-replace " .. name .. "\n[options]\n.br\n") end
  add(".SH DESCRIPTION\n")
  add(block(parser:get_help()))
  add(".SH COMMANDS\n")
  for _, name in ipairs(M.ORDER) do
    add(".SS " .. name .. "\n")
    add(block(cmds[name]:get_help()))
  end
  add(".SH ENVIRONMENT\n")
  add(block("ENOS_ENDPOINT, ENOS_ACCESS_KEY, ENOS_SECRET_KEY, ENOS_ORG_ID, ENOS_PRIVATE_KEY_FILE, ENOS_CA_FILE,\n" ..
    "ENOS_API_VERSION, ENOS_TIMEOUT: the settings (over the profile file, under the flags).\n" ..
    "ENOS_PROFILE: the profile (section) to use. ENOS_CONFIG: the profile file.\n" ..
    "ENOS_DEBUG=1: the details of an internal error."))
  add(".SH FILES\n")
  add(block("$ENOS_CONFIG, else $XDG_CONFIG_HOME/enos/config, else ~/.config/enos/config: the profile file\n" ..
    "(INI: [profile] sections of key = value lines; keep it mode 0600)."))
  add(".SH SEE ALSO\n")
  add("enos-sim(1) (the local simulator); docs/enos-replace.md in the source for the full reference.\n")
  return table.concat(out)
end

return M
