--- enos-replace: the command-line front of enos.workflow.
--
-- `main(ctx)` runs one command in-process and returns the exit code; ctx:
--   argv (list), env (table or getenv function), stdout / stderr (function(s) or file handle),
--   stdin (function returning a line, or a file handle), isatty (stdin is a terminal),
--   and for tests sleep, clock, client_options (merged into the client options).
-- @module enos.cli
local argparse = require "argparse"
local core = require "enos.core"
local enos = require "enos"
local target_mod = require "enos.target"
local errors = require "enos.errors"
local profile = require "enos.profile"
local workflow = require "enos.workflow"
local out = require "enos.cli.output"
local batch_cmd = require "enos.cli.batch"
local watch_cmd = require "enos.cli.watch"
local audit_cmd = require "enos.cli.audit"

local M = {}

--- Exit codes.
M.EXIT = {
  ok = 0,          -- done
  aborted = 1,     -- not confirmed at the prompt, or an internal error
  usage = 2,       -- bad command line, no confirmation possible, output file exists
  config = 3,      -- configuration missing or invalid, authentication failed
  refused = 4,     -- the platform (or the preflight) refused; nothing changed
  network = 5,     -- network / TLS / timeout / platform unavailable after retries; includes OUTCOME UNKNOWN
  verify = 6,      -- the replace happened but verification or delivery failed
  not_online = 7,  -- done, but the new device did not come online in time
}
local EXIT = M.EXIT

local PROG = "enos-replace"

local EXIT_TEXT = [[
Exit codes:
   0  done
   1  not confirmed at the prompt (nothing changed), or an internal error
   2  usage: bad arguments, no terminal to confirm on and no --yes, output file exists
   3  configuration: missing or invalid settings, authentication failed, no RSA key pair
   4  refused by the platform or by the preflight (error kind and code shown); nothing changed
   5  network, TLS, timeout, or the platform unavailable after retries (also: OUTCOME UNKNOWN)
   6  the replace happened but verification, delivery of the secret, or a step after it (gateway link,
      certificate, tags) failed: run the same command again with --finish
   7  done, but the new device did not come online within --wait-active (watch: devices not online
      when --wait ended)]]

local CONFIG_TEXT = [[
Configuration (highest first): flags > environment (ENOS_ENDPOINT, ENOS_ACCESS_KEY, ENOS_SECRET_KEY,
ENOS_ORG_ID, ENOS_PRIVATE_KEY_FILE, ENOS_CA_FILE, ENOS_API_VERSION, ENOS_TIMEOUT, ENOS_PROFILE)
> profile file ($ENOS_CONFIG, else $XDG_CONFIG_HOME/enos/config, else ~/.config/enos/config).]]

-- ---------------------------------------------------------------- parser

local function connection_options(cmd)
  cmd:group("Connection",
    cmd:option("--profile", "Profile (section) of the profile file.", nil):argname("<name>"),
    cmd:option("--endpoint", "API gateway URL, e.g. https://apim-ppe1.envisioniot.com."):argname("<url>"),
    cmd:option("--access-key", "Application access key (appKey)."):argname("<key>"),
    cmd:option("--secret-key", "Application secret key. Visible in `ps`: prefer ENOS_SECRET_KEY or a profile.")
      :argname("<secret>"),
    cmd:option("--org-id", "Organization (OU) id."):argname("<id>"),
    cmd:option("--private-key-file", "The application's RSA private key (PKCS#8 PEM), to decrypt secrets.")
      :argname("<file>"),
    cmd:option("--ca-file", "CA certificates (PEM) to verify the gateway with."):argname("<file>"),
    cmd:option("--api-version", "v2.4 (default; encrypted secrets) or v2.1 (clear secrets)."):argname("<v>")
      :choices { "v2.4", "v2.1" },
    cmd:option("--timeout", "Per-request timeout in seconds (default 30)."):argname("<s>")
  )
end

local function target_options(cmd)
  cmd:group("Device",
    cmd:option("--asset-id", "The device's assetId."):argname("<A>"),
    cmd:option("--product-key", "The device's productKey (with --device-key)."):argname("<P>"),
    cmd:option("--device-key", "The device's current deviceKey (with --product-key)."):argname("<D>")
  )
end

local function help_flag(cmd, state, name)
  cmd:add_help(false)
  cmd:flag("-h --help", "Show this help and exit."):action(function() state.help = state.help or name end)
end

local function build_parser(state)
  local p = argparse(PROG, "Replace the device key of an Envision EnOS device (a hardware swap), safely.")
  help_flag(p, state, "main")
  p:flag("--version", "Print the version and exit.")
  p:command_target("command")
  p:require_command(false)
  p:epilog(table.concat({
    "Run `enos-replace <command> --help` for the options and examples of each command.",
    "",
    CONFIG_TEXT, "", EXIT_TEXT,
  }, "\n"))

  local d = p:command("device", "Replace a device's key: the new hardware gets the asset, its data and a new secret.")
  help_flag(d, state, "device")
  target_options(d)
  d:group("Replacement",
    d:option("--new-key", "The new hardware's deviceKey (4-64 of A-Z a-z 0-9 - _ .)."):argname("<K>"),
    d:flag("--no-secret", "Do not request the new deviceSecret (the device will need dynamic activation)."),
    d:option("--out", "Write the provisioning record (with the secret) to this new file, mode 0600."):argname("<file>"),
    d:option("--format", "Record format: json (default), env or text."):argname("<fmt>")
      :choices { "json", "env", "text" },
    d:flag("--overwrite", "Allow --out to replace an existing file."),
    d:option("--wait-active", "Then wait up to this many seconds for the new hardware to come online.")
      :argname("<s>"),
    d:flag("--dry-run", "Run the preflight and show the signed requests; change nothing."),
    d:flag("-y --yes", "Do not ask for confirmation."),
    d:flag("--skip-free-check", "Do not search that the new key is free before replacing."),
    d:option("--max-attempts", "Replace attempts in all when the outcome is unknown (default 3)."):argname("<n>"),
    d:option("--max-retry-after", "The longest Retry-After (s) honoured when throttled (default 300)."):argname("<s>"),
    d:flag("--finish", "The device was replaced before (it has the new key): do what is left (secret, certificate, " ..
      "gateway link, tags) without replacing again; refused when the device does not have the new key."),
    d:flag("--no-gateway-check", "Do not ask for the device's gateway (a sub-device's link is then not checked).")
  )
  d:group("Certificates (two-way TLS products)",
    d:option("--csr", "The new unit's certificate signing request (PEM): after the replace, the old unit's " ..
      "certificates are revoked and one is issued for it, into --out."):argname("<file>"),
    d:option("--cert-days", "The new certificate's validity in days (default 730)."):argname("<n>"),
    d:flag("--no-cert-check", "Do not list the device's certificates (a valid one then does not stop the replace).")
  )
  d:group("Trail",
    d:option("--tag", "Stamp the asset with a tag after the replace (repeatable): NAME=VALUE."):argname("<k=v>")
      :count("*"),
    d:flag("--stamp", "Also tag replacedAt (UTC) and replacedFrom (the old key), to find the swap later.")
  )
  d:group("Output",
    d:flag("--json", "Print one JSON document on stdout."),
    d:flag("--show-secret", "Also print the new deviceSecret (default: only into --out).")
  )
  connection_options(d)
  d:epilog([[
Examples:
   # swap by assetId; the secret goes to a new 0600 file
   enos-replace device --asset-id Nmw9npSq --new-key dev_new_01 --out dev_new_01.json

   # by productKey + current deviceKey, env-style record, wait 10 minutes for the new unit
   enos-replace device --product-key pk_demo --device-key dev_old_01 --new-key dev_new_01 \
       --out /etc/enos/device.env --format env --wait-active 600

   # see what would be sent, change nothing
   enos-replace device --asset-id Nmw9npSq --new-key dev_new_01 --dry-run

   # in a script (no terminal): --yes is required, --json for the result
   enos-replace device --profile prod --asset-id Nmw9npSq --new-key dev_new_01 --out cred.json --yes --json

Without a private key (V2.4) the new secret is not requested. When it is requested, give --out FILE
(or --show-secret): the command refuses to run without a place for the secret.
]] .. "\n" .. EXIT_TEXT)

  local b = batch_cmd.add_command(p, {
    help_flag = function(cmd, name) return help_flag(cmd, state, name) end,
    connection_options = connection_options,
  })

  local wcmd = watch_cmd.add_command(p, {
    help_flag = function(cmd, name) return help_flag(cmd, state, name) end,
    connection_options = connection_options,
  })

  local acmd = audit_cmd.add_command(p, {
    help_flag = function(cmd, name) return help_flag(cmd, state, name) end,
    connection_options = connection_options,
  })

  local g = p:command("get", "Show a device (and, with --secret, its current deviceSecret).")
  help_flag(g, state, "get")
  target_options(g)
  g:group("Secret",
    g:flag("--secret", "Request the deviceSecret (decrypted with --private-key-file on V2.4)."),
    g:option("--out", "Write the record with the secret to this new file, mode 0600."):argname("<file>"),
    g:option("--format", "Record format: json (default), env or text."):argname("<fmt>")
      :choices { "json", "env", "text" },
    g:flag("--overwrite", "Allow --out to replace an existing file."),
    g:flag("--show-secret", "Print the secret on stdout.")
  )
  g:flag("--json", "Print one JSON document on stdout.")
  connection_options(g)
  g:epilog([[
Examples:
   enos-replace get --asset-id Nmw9npSq
   enos-replace get --product-key pk_demo --device-key dev_new_01 --json
   enos-replace get --asset-id Nmw9npSq --secret --out cred.json
]] .. "\n" .. EXIT_TEXT)

  local c = p:command("config", "Show the resolved configuration and the source of each value (secrets masked).")
  help_flag(c, state, "config")
  c:flag("--json", "Print one JSON document on stdout.")
  connection_options(c)
  c:epilog([[
Examples:
   enos-replace config
   enos-replace config --profile prod --json
   ENOS_CONFIG=./enos.ini enos-replace config

Profile file format (INI; `#` or `;` starts a comment line):
   [default]
   endpoint = https://apim-ppe1.envisioniot.com
   org_id = o15724268424841
   access_key = 5acb82e7-a11e-4300-9164-c8b20b638e8b
   secret_key = ...
   private_key_file = ~/.config/enos/app_private.pem

Exits 3 when a required setting (endpoint, access_key, secret_key, org_id) is missing.
]] .. CONFIG_TEXT)
  local hcmd = p:command("help", "Show the help of enos-replace or of one command (`enos-replace help batch`).")
  help_flag(hcmd, state, "help")
  hcmd:argument("topic", "A command: device, batch, watch, audit, get, config, completion."):args("?")
    :choices { "device", "batch", "watch", "audit", "get", "config", "completion", "help" }
  local comp = p:command("completion", "Print a shell completion script: bash, zsh or fish.")
  help_flag(comp, state, "completion")
  comp:argument("shell", "bash, zsh or fish."):choices { "bash", "zsh", "fish" }
  comp:epilog([[
Examples:
   enos-replace completion bash > /etc/bash_completion.d/enos-replace
   enos-replace completion zsh > "${fpath[1]}/_enos-replace"
   enos-replace completion fish > ~/.config/fish/completions/enos-replace.fish
(`make install` and the rock install them for you.)]])
  -- An option given twice (`--asset-id A --asset-id B`, a shell history edit) is refused, not the last one
  -- silently taken: every option that takes a value is single-valued (argparse: "must be used at most 1 time").
  for _, cmd in ipairs { p, d, b, wcmd, acmd, g, c, hcmd, comp } do
    for _, opt in ipairs(cmd._options or {}) do
      if (opt._maxargs or 0) > 0 then opt:overwrite(false) end
    end
  end
  return p, { main = p, device = d, get = g, config = c, batch = b, watch = wcmd, audit = acmd, help = hcmd, completion = comp }
end

--- The parser and its commands (for the man page and the completions): parser, {name → command}.
function M.parser()
  return build_parser({})
end

--- What --version prints: enos, Lua, libcurl and OpenSSL versions (what a bug report needs).
function M.version_text(prog)
  local v = enos.versions()
  return string.format("%s %s\nLua: %s\nlibcurl: %s (TLS: %s)\nOpenSSL: %s\n", prog or PROG, enos._VERSION,
    v.lua, v.libcurl, v.libcurl_ssl, v.openssl)
end

-- ---------------------------------------------------------------- context

local function writer(w, default)
  if w == nil then w = default end
  if type(w) == "function" then return w end
  return function(s) w:write(s) end
end

local function reader(r)
  if type(r) == "function" then return r end
  if r == nil then r = io.stdin end
  return function() return r:read("*l") end
end

-- Reads stdin in chunks (a plan given as "-"): a file handle in blocks, a line reader line by line.
local function chunk_reader(r)
  if type(r) == "function" then
    return function() local l = r() return l and l .. "\n" end
  end
  if r == nil then r = io.stdin end
  return function() return r:read(65536) end
end

local function new_ctx(ctx)
  local env = ctx.env
  local getenv
  if type(env) == "function" then getenv = env
  elseif type(env) == "table" then getenv = function(k) return env[k] end
  else getenv = os.getenv end
  return {
    argv = ctx.argv or {}, getenv = getenv,
    out = writer(ctx.stdout, io.stdout), err = writer(ctx.stderr, io.stderr), readline = reader(ctx.stdin),
    read_chunk = chunk_reader(ctx.stdin),
    isatty = ctx.isatty == true, stderr_tty = ctx.stderr_tty == true, sleep = ctx.sleep, clock = ctx.clock, client_options = ctx.client_options,
  }
end

local function say(c, fmt, ...)
  c.err(PROG .. ": " .. string.format(fmt, ...) .. "\n")
end

-- Prints an error on stderr (and as JSON on stdout with --json) and returns its exit code.
local function report_error(c, args, err, code, extra, note)
  say(c, "%s", out.error_text(err))
  if note then c.err(note .. "\n") end
  if args and args.json then
    local v = { ok = false, exit_code = code, error = out.error_view(err) }
    for k, x in pairs(extra or {}) do v[k] = x end
    c.out(out.json(v, true) .. "\n")
  end
  return code
end

--- Maps an error to an exit code.
function M.exit_code(err)
  if type(err) ~= "table" then return EXIT.aborted end
  if err.aborted then return EXIT.aborted end
  if err.wrong_device then return EXIT.network end        -- something changed that was not asked for: look now
  if err.verify_failed or err.deliver_failed or err.secret_missing then return EXIT.verify end
  -- the steps after a replace (it happened): the gateway link, the certificate swap, the tags
  if err.step == "link" or err.step == "certificate" or err.step == "tag" then return EXIT.verify end
  if err.field == "out" then return EXIT.usage end
  local k = err.kind
  if k == "config" or k == "auth" or k == "decrypt" then return EXIT.config end
  if err.refused then return EXIT.refused end
  if k == "invalid_argument" then return (err.code or err.status) and EXIT.refused or EXIT.usage end
  if k == "permission" or k == "not_found" or k == "conflict" then return EXIT.refused end
  return EXIT.network
end

-- ---------------------------------------------------------------- shared steps

local function flags_of(args)
  return {
    endpoint = args.endpoint, access_key = args.access_key, secret_key = args.secret_key, org_id = args.org_id,
    private_key_file = args.private_key_file, ca_file = args.ca_file, api_version = args.api_version,
    timeout = args.timeout,
  }
end

local function resolve_config(c, args)
  local r, err = profile.resolve { flags = flags_of(args), env = c.getenv, profile = args.profile }
  if not r then return nil, err end
  for _, w in ipairs(r.warnings) do say(c, "warning: %s", w) end
  return r
end

-- Client options as a command-line user knows them.
local CLIENT_FLAGS = {
  endpoint = "--endpoint, ENOS_ENDPOINT or the profile's endpoint",
  access_key = "--access-key, ENOS_ACCESS_KEY or the profile's access_key",
  secret_key = "--secret-key, ENOS_SECRET_KEY or the profile's secret_key",
  org_id = "--org-id, ENOS_ORG_ID or the profile's org_id",
  timeout = "--timeout, ENOS_TIMEOUT or the profile's timeout",
  cafile = "--ca-file, ENOS_CA_FILE or the profile's ca_file",
  private_key_file = "--private-key-file, ENOS_PRIVATE_KEY_FILE or the profile's private_key_file",
  file = "--private-key-file, ENOS_PRIVATE_KEY_FILE or the profile's private_key_file",
  api_version = "--api-version, ENOS_API_VERSION or the profile's api_version",
}

local function make_client(c, args)
  local r, err = resolve_config(c, args)
  if not r then return nil, report_error(c, args, err, EXIT.config) end
  local missing = profile.missing(r)
  if #missing > 0 then
    local names = {}
    for _, s in ipairs(missing) do
      names[#names + 1] = string.format("%s (--%s, %s or '%s' in the profile)", s.name, s.flag, s.env, s.name)
    end
    local e = errors.new("config", "missing configuration: " .. table.concat(names, "; ") ..
      (r.file_exists and (" [profile '" .. r.profile .. "' of " .. r.file .. "]") or
        (r.file and (" [no profile file at " .. r.file .. "]") or "")))
    return nil, report_error(c, args, e, EXIT.config)
  end
  local opts = {}
  for k, v in pairs(r.options) do opts[k] = v end
  for k, v in pairs(c.client_options or {}) do opts[k] = v end
  local client
  client, err = enos.client(opts)
  if not client then
    -- a client option's error names the flag and the other places the setting can come from
    local where = err.field and CLIENT_FLAGS[err.field]
    if where then err.message = tostring(err.message) .. " (" .. where .. ")" end
    return nil, report_error(c, args, err, EXIT.config)
  end
  return client, r
end

-- The device flags as a target, checked by enos.target (the rule of the Lua API and the plan), its messages
-- naming the flags. new_key: --new-key is part of it (a replace), else a read.
local FLAG_NAMES = { assetId = "--asset-id", productKey = "--product-key", deviceKey = "--device-key",
  newDeviceKey = "--new-key" }
local function target_of(c, args, new_key)
  local t, why = target_mod.check({ assetId = args.asset_id, productKey = args.product_key,
    deviceKey = args.device_key, newDeviceKey = args.new_key }, { names = FLAG_NAMES, new_key = new_key or false })
  if not t then say(c, "%s", why) return nil end
  return t
end

local function number_arg(c, args, name, flag, integer)
  local v = args[name]
  if v == nil then return true end
  local n = tonumber(v)
  if not n or n < 0 or n ~= n or n == math.huge or (integer and (n < 1 or n % 1 ~= 0)) then
    say(c, "%s must be a %s", flag, integer and "whole number >= 1" or "number of seconds >= 0")
    return nil
  end
  args[name] = n
  return true
end

-- ---------------------------------------------------------------- commands

local function cmd_device(c, args)
  local target = target_of(c, args, true)
  if not target then return EXIT.usage end
  if not number_arg(c, args, "wait_active", "--wait-active") then return EXIT.usage end
  if not number_arg(c, args, "max_attempts", "--max-attempts", true) then return EXIT.usage end
  if not number_arg(c, args, "max_retry_after", "--max-retry-after") then return EXIT.usage end
  if args.overwrite and not args.out then say(c, "--overwrite needs --out") return EXIT.usage end
  if args.format and not args.out then say(c, "--format needs --out") return EXIT.usage end
  if not number_arg(c, args, "cert_days", "--cert-days", true) then return EXIT.usage end
  local csr
  if args.csr then
    local why
    csr, why = require("enos.aftercare").read_csr(args.csr)
    if not csr then say(c, "--csr: %s", why) return EXIT.usage end
    if not args.out and not args.dry_run then
      say(c, "--csr needs --out FILE: the new certificate is delivered with the credentials record")
      return EXIT.usage
    end
  elseif args.cert_days then
    say(c, "--cert-days goes with --csr") return EXIT.usage
  end
  local tags
  for _, t in ipairs(args.tag or {}) do
    local k, v = t:match("^([^=]*)=(.*)$")
    local why = not k and "--tag " .. t .. ": expected NAME=VALUE" or require("enos.aftercare").tag_problem(k, v)
    if why then say(c, "--tag: %s", why) return EXIT.usage end
    tags = tags or {}
    if tags[k] then say(c, "--tag: %s is given twice", k) return EXIT.usage end
    tags[k] = v
  end
  if not args.yes and not args.dry_run and not c.isatty then
    say(c, "refusing to change a device without confirmation: stdin is not a terminal. " ..
      "Add --yes to confirm in advance (or --dry-run to only look).")
    return EXIT.usage
  end

  local client, r = make_client(c, args)
  if not client then return r end
  local v21 = client.api_version == "v2.1"
  local wants_secret = not args.no_secret and (v21 or client:has_private_key())
  if args.no_secret and v21 then say(c, "--no-secret has no effect with api_version v2.1 (the reply carries the secret)") end
  if args.no_secret and args.show_secret then say(c, "--show-secret and --no-secret contradict each other") return EXIT.usage end
  if (args.out or args.show_secret) and not args.no_secret and not v21 and not client:has_private_key() then
    -- the operator asked for the secret; a forgotten ENOS_PRIVATE_KEY_FILE must not end as "done" without it
    say(c, "no private key is configured, so the new deviceSecret cannot be decrypted: set --private-key-file " ..
      "(or ENOS_PRIVATE_KEY_FILE, or the profile's private_key_file), or give --no-secret to replace without it")
    return EXIT.usage
  end
  if wants_secret and not args.out and not args.show_secret and not args.dry_run then
    say(c, "the new deviceSecret needs somewhere to go: give --out FILE (recommended), or --show-secret, " ..
      "or --no-secret to not request it")
    return EXIT.usage
  end

  local wopts = {
    check_free = not args.skip_free_check, dry_run = args.dry_run or nil, out = args.out,
    format = args.format or "json", overwrite = args.overwrite or nil, wait_active = args.wait_active,
    max_attempts = args.max_attempts, clock = c.clock, max_retry_after = args.max_retry_after,
    csr = csr, cert_valid_day = args.cert_days, check_certificates = not args.no_cert_check,
    check_gateway = not args.no_gateway_check, tags = tags, stamp = args.stamp or nil, finish = args.finish or nil,
    -- a long wait (a throttled gateway's Retry-After, a backoff) is said, so the command does not look stuck
    sleep = function(s)
      if s >= 5 then say(c, "waiting %d s before trying again (the gateway is throttling or busy)", math.ceil(s)) end
      return (c.sleep or workflow.default_sleep)(s)
    end,
  }
  -- require_secret stays nil (= when a private key is loaded, or V2.1) unless --no-secret
  if args.no_secret then wopts.require_secret = false end
  local function confirmed(plan)
    -- from here on the replace may reach the platform: an interrupt is an unknown outcome
    c.pending = { replace = true, asset = plan.assetId, new_key = plan.newDeviceKey, out = args.out }
    return true
  end
  wopts.confirm = function(plan)
    if not args.json or not args.yes then c.err(out.plan_text(plan, client.endpoint, client.org_id)) end
    if args.yes then return confirmed(plan) end
    c.err("Proceed? [y/N] ")
    local answer = c.readline()
    if answer and answer:lower():match("^%s*y[es]*%s*$") then return confirmed(plan) end
    c.err("Not confirmed; nothing changed.\n")
    return false
  end

  local report, err = workflow.replace(client, target, wopts)
  c.pending = nil
  client:close()
  if not report then
    local code = M.exit_code(err)
    if err.aborted then return code end
    local r0 = err.report
    local asset = r0 and r0.old and r0.old.assetId
    local note
    if err.outcome_unknown then
      note = string.format("OUTCOME UNKNOWN for asset %s: check it with `%s get --asset-id %s` before anything else.",
        tostring(asset), PROG, tostring(asset))
    elseif err.wrong_device then
      note = "ANOTHER DEVICE WAS REPLACED: asset " .. tostring(err.wrong_device) .. " (not " .. tostring(asset) ..
        ")" .. (args.out and (r0 and r0.delivered and ("; its new credentials are in " .. args.out) or "") or "") ..
        ". Check both with `" .. PROG .. " get --asset-id …` before anything else."
    elseif r0 and r0.outcome == "conflict" and err.refused then
      note = "Nothing was changed by this command: the device changed since its preflight (see the key above); " ..
        "check it with `" .. PROG .. " get --asset-id " .. tostring(asset) .. "` before deciding what to do."
    elseif r0 and r0.outcome == "conflict" then
      note = "The device changed since its preflight (see the key above); check it with `" .. PROG ..
        " get --asset-id " .. tostring(asset) .. "` before deciding what to do."
    elseif r0 and (r0.outcome == "refused" or r0.outcome == "failed") then
      note = "Nothing was changed."
    end
    return report_error(c, args, err, code, r0 and { report = out.report_view(r0, false) } or nil, note)
  end

  local code = EXIT.ok
  if report.error then code = M.exit_code(report.error) end
  if code == EXIT.ok and report.wait and not report.wait.online then code = EXIT.not_online end
  -- A record that could not be written must not be lost: print it, whatever --show-secret says.
  local rescue = report.error and report.error.deliver_failed and report:record()
  if args.json then
    local v = out.report_view(report, args.show_secret or rescue ~= nil)
    v.exit_code = code
    c.out(out.json(v, true) .. "\n")
  else
    c.out(out.report_text(report, args.show_secret))
  end
  if rescue then
    say(c, "could not write %s (%s); the record follows on stdout so the secret is not lost", tostring(args.out),
      tostring(report.error.message))
    if not args.json then c.out(workflow.render_record(rescue, "json")) end
  elseif report.error then
    say(c, "the replace happened but: %s", out.error_text(report.error))
  end
  if code == EXIT.not_online then
    say(c, "done, but the new device did not come online within %s s", tostring(args.wait_active))
  end
  return code
end

local function cmd_get(c, args)
  local target = target_of(c, args)
  if not target then return EXIT.usage end
  if (args.out or args.show_secret or args.format or args.overwrite) and not args.secret then
    say(c, "--out, --format, --overwrite and --show-secret go with --secret")
    return EXIT.usage
  end
  if args.format and not args.out then say(c, "--format needs --out") return EXIT.usage end
  if args.secret and not args.out and not args.show_secret then
    say(c, "--secret needs somewhere to put the secret: --out FILE or --show-secret")
    return EXIT.usage
  end
  if args.out then
    local ok, werr = workflow.check_writable(args.out, args.overwrite)
    if not ok then return report_error(c, args, werr, EXIT.usage) end
  end
  local client, r = make_client(c, args)
  if not client then return r end
  local p = { assetId = target.assetId, productKey = target.productKey, deviceKey = target.deviceKey }
  if args.secret then p.requireSecret = true end
  local dev, err = client:get_device(p)
  if not dev then client:close() return report_error(c, args, err, M.exit_code(err)) end
  if (target.assetId and dev.assetId ~= target.assetId) or
      (not target.assetId and (dev.productKey ~= target.productKey or dev.deviceKey ~= target.deviceKey)) then
    -- a reply about another device: its secret must not be written as this device's
    client:close()
    return report_error(c, args, errors.new("protocol", "the platform answered with another device (assetId " ..
      tostring(dev.assetId) .. ", deviceKey " .. tostring(dev.deviceKey) .. "); nothing was written"), EXIT.network)
  end
  -- the secret in hand, as asked: decrypted when a private key is loaded (V2.1: in clear)
  local missing = args.secret and not workflow.secret_in_hand(client, true, dev)
  if missing then
    say(c, "warning: the secret is not in hand: %s", dev.err and ("it could not be decrypted: " .. tostring(dev.err))
      or "the reply carries no (complete) secret")
  end
  if args.out then
    local rec = workflow.make_record(client, dev, { replacedAt = false })
    rec.replacedAt = nil
    rec.outcome = nil
    rec.status = dev.status
    local ok, werr = workflow.write_private(args.out, workflow.render_record(rec, args.format or "json"), args.overwrite)
    if not ok then client:close() return report_error(c, args, werr, EXIT.usage) end
  end
  client:close()
  if args.json then
    local v = { ok = true, device = out.device_view(dev, args.show_secret), secret_file = args.out }
    c.out(out.json(v, true) .. "\n")
  else
    c.out(out.device_text(dev, args.show_secret))
    if args.out then c.out(string.format("  %-15s %s\n", "secret", "written to " .. args.out .. " (mode 0600)")) end
  end
  return missing and EXIT.verify or EXIT.ok
end

local function cmd_config(c, args)
  local r, err = resolve_config(c, args)
  if not r then return report_error(c, args, err, EXIT.config) end
  local missing = profile.missing(r)
  local key_note
  local pk = r.values.private_key_file
  if pk then
    local key, kerr = require("enos.secret").load_private_key { file = pk.value }
    key_note = key and "loads" or ("NOT usable: " .. tostring(kerr and kerr.message))
  end
  if args.json then
    local v = { ok = #missing == 0, profile = r.profile, profile_source = r.profile_source, file = r.file,
      file_found_by = r.file_how, file_exists = r.file_exists or false, file_mode = r.file_mode,
      settings = {}, missing = out.array(), warnings = out.array(r.warnings), private_key = key_note }
    for _, s in ipairs(profile.SETTINGS) do
      local x = r.values[s.name]
      v.settings[s.name] = x and { value = profile.mask(s.name, x.value), source = x.source } or { source = "not set" }
    end
    for _, s in ipairs(missing) do v.missing[#v.missing + 1] = s.name end
    c.out(out.json(v, true) .. "\n")
  else
    local lines = {}
    lines[#lines + 1] = string.format("profile file  %s (%s)", tostring(r.file),
      r.file_exists and ("found via " .. tostring(r.file_how) .. ", mode " .. tostring(r.file_mode)) or "not present")
    lines[#lines + 1] = string.format("profile       %s (%s)", r.profile, r.profile_source)
    lines[#lines + 1] = ""
    for _, s in ipairs(profile.SETTINGS) do
      local x = r.values[s.name]
      local val = x and profile.mask(s.name, x.value) or "(not set)"
      if s.name == "private_key_file" and key_note then val = val .. "  [" .. key_note .. "]" end
      lines[#lines + 1] = string.format("%-17s %-45s %s", s.name, val, x and x.source or (s.required and "REQUIRED" or ""))
    end
    c.out(table.concat(lines, "\n") .. "\n")
  end
  if #missing > 0 then
    local names = {}
    for _, s in ipairs(missing) do names[#names + 1] = s.name end
    say(c, "missing: %s", table.concat(names, ", "))
    return EXIT.config
  end
  return EXIT.ok
end

-- ---------------------------------------------------------------- main

local function run(c)
  local state = {}
  local parser, cmds = build_parser(state)
  local ok, args = parser:pparse(c.argv)
  if state.help then
    c.out(cmds[state.help]:get_help() .. "\n")
    return EXIT.ok
  end
  if not ok then
    local cmd = cmds[c.argv[1]] or parser
    -- (argparse reads "-1" as an unknown option and suggests -h: say what it is instead)
    for i = 2, #c.argv do
      local a, before = c.argv[i], c.argv[i - 1]
      if a:match("^%-%.?%d") and before:match("^%-%-") then
        args = ("%s %s: a negative number is not a valid value here"):format(before, a)
        break
      end
    end
    c.err(cmd:get_usage() .. "\n\n" .. PROG .. ": " .. tostring(args) .. "\n")
    return EXIT.usage
  end
  if args.version then
    c.out(M.version_text())
    return EXIT.ok
  end
  if args.command == "help" then
    c.out(cmds[args.topic or "main"]:get_help() .. "\n")
    return EXIT.ok
  end
  if args.command == "completion" then
    local gen = { bash = "get_bash_complete", zsh = "get_zsh_complete", fish = "get_fish_complete" }
    c.out(parser[gen[args.shell]](parser))
    return EXIT.ok
  end
  if not args.command then
    c.err(parser:get_usage() .. "\n\n" .. PROG .. ": a command is required (device, batch, watch, audit, get, config or help); see --help\n")
    return EXIT.usage
  end
  if args.timeout ~= nil then
    local n = tonumber(args.timeout)
    if not n or n <= 0 then say(c, "--timeout must be a positive number of seconds") return EXIT.usage end
  end
  if args.command == "device" then return cmd_device(c, args) end
  if args.command == "get" then return cmd_get(c, args) end
  if args.command == "batch" then
    return batch_cmd.run(c, args, { EXIT = EXIT, say = say, make_client = make_client, report_error = report_error })
  end
  if args.command == "watch" then
    return watch_cmd.run(c, args, { EXIT = EXIT, say = say, make_client = make_client, report_error = report_error })
  end
  if args.command == "audit" then
    return audit_cmd.run(c, args, { EXIT = EXIT, say = say, make_client = make_client, report_error = report_error })
  end
  return cmd_config(c, args)
end

--- Runs one command; returns the exit code (never raises).
-- Ctrl-C: the interpreter raises "interrupted!" at the next Lua instruction (a transfer under way finishes
-- first). What that means depends on where the command was.
local function interrupted(c)
  local p = c.pending
  if p and p.replace then
    say(c, "interrupted. OUTCOME UNKNOWN for asset %s: the replace (-> %s) may have been applied. Before anything " ..
      "else, recover the secret with:\n  %s get --asset-id %s --secret --out %s", tostring(p.asset),
      tostring(p.new_key), PROG, tostring(p.asset), p.out and (p.out .. ".recovered") or "FILE")
    return EXIT.network
  elseif p and p.batch then
    say(c, "interrupted. The journal is consistent: continue with the same command and --resume:\n  %s", p.batch)
    return EXIT.network
  end
  say(c, "interrupted; nothing was changed")
  return 130
end

function M.main(ctx)
  local c = new_ctx(ctx or {})
  local trace
  local ok, code = xpcall(function() return run(c) end,    -- (5.1: xpcall passes no arguments)
    function(e) trace = debug.traceback(tostring(e), 2) return e end)
  if ok then return code end
  if tostring(code):find("interrupted!", 1, true) then return interrupted(c) end
  -- a bug of ours: one line (no Lua traceback on the terminal) unless ENOS_DEBUG=1 asks for it
  c.err(PROG .. ": internal error: " .. errors.clean(tostring(code)) .. "\n")
  if c.getenv("ENOS_DEBUG") == "1" then c.err(tostring(trace) .. "\n")
  else c.err(PROG .. ": (run with ENOS_DEBUG=1 for the details to report)\n") end
  return EXIT.aborted
end

--- Entry point of bin/enos-replace: real stdio, environment and terminal check.
function M.run_process(argv)
  -- a CI job's timeout (TERM) or a closed session (HUP) ends a command as Ctrl-C does: it says what it leaves
  core.interrupt_on { "TERM", "HUP" }
  local list = {}
  for i = 1, #(argv or {}) do list[i] = argv[i] end
  local code = M.main {
    argv = list, env = os.getenv, stdout = io.stdout, stderr = io.stderr, stdin = io.stdin,
    isatty = core.isatty(0), stderr_tty = core.isatty(2),
  }
  io.stdout:flush()
  io.stderr:flush()
  return code
end

return M
