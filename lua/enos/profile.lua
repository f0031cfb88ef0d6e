--- Configuration, resolved one way for the CLI and the Lua API: explicit values (the CLI's flags, the options
-- table given to `enos.replace_device` and friends) > environment > profile file > defaults.
--
-- The profile file (`$ENOS_CONFIG`, else `$XDG_CONFIG_HOME/enos/config`, else `$HOME/.config/enos/config`)
-- is INI-style: `[name]` sections, `key = value` lines, `#` or `;` comment lines.
-- @module enos.profile
local errors = require "enos.errors"

local M = {}

--- Every setting: name (profile key), env variable, flag (without dashes), client option.
M.SETTINGS = {
  { name = "endpoint", env = "ENOS_ENDPOINT", flag = "endpoint", opt = "endpoint", required = true },
  { name = "access_key", env = "ENOS_ACCESS_KEY", flag = "access-key", opt = "access_key", required = true },
  { name = "secret_key", env = "ENOS_SECRET_KEY", flag = "secret-key", opt = "secret_key", required = true,
    secret = true },
  { name = "org_id", env = "ENOS_ORG_ID", flag = "org-id", opt = "org_id", required = true },
  { name = "private_key_file", env = "ENOS_PRIVATE_KEY_FILE", flag = "private-key-file", opt = "private_key_file",
    path = true },
  { name = "ca_file", env = "ENOS_CA_FILE", flag = "ca-file", opt = "cafile", path = true },
  { name = "api_version", env = "ENOS_API_VERSION", flag = "api-version", opt = "api_version", default = "v2.4" },
  { name = "timeout", env = "ENOS_TIMEOUT", flag = "timeout", opt = "timeout", number = true, default = 30 },
}

local BY_NAME = {}
for _, s in ipairs(M.SETTINGS) do BY_NAME[s.name] = s end
--- The settings by name (profile key).
M.BY_NAME = BY_NAME

local function getter(env)
  if type(env) == "function" then return env end
  if type(env) == "table" then return function(k) return env[k] end end
  return os.getenv
end

local function nonempty(v)
  if v == nil or v == "" then return nil end
  return v
end

--- Where the profile file is: path, how it was found (or nil, reason when no location is known).
function M.config_path(env)
  local get = getter(env)
  local p = nonempty(get("ENOS_CONFIG"))
  if p then return p, "$ENOS_CONFIG" end
  local xdg = nonempty(get("XDG_CONFIG_HOME"))
  if xdg then return xdg .. "/enos/config", "$XDG_CONFIG_HOME" end
  local home = nonempty(get("HOME"))
  if home then return home .. "/.config/enos/config", "$HOME" end
  return nil, "neither ENOS_CONFIG, XDG_CONFIG_HOME nor HOME is set"
end

local function trim(s) return (s:gsub("^%s+", ""):gsub("%s+$", "")) end

--- Parses INI text: returns {sections = {name -> {key -> {value, line}}}, order = {names}, warnings} | nil, err.
function M.parse(text, path)
  local out = { sections = {}, order = {}, warnings = {} }
  local current
  local n = 0
  for line in (text .. "\n"):gmatch("([^\n]*)\n") do
    n = n + 1
    line = trim(line:gsub("\r$", ""))
    local skip = line == "" or line:match("^[#;]")  -- blank or comment
    if not skip then
      if line:match("^%[") then
        local name = line:match("^%[%s*([^%]]-)%s*%]$")
        if not name or name == "" then
          return nil, errors.new("config", string.format("%s:%d: bad section header %s", path, n, line))
        end
        name = name:gsub("^profile%s+", "")        -- accept [profile name] like the AWS CLI
        if out.sections[name] then
          -- (two [default] sections: which one's values win would be an accident of the file's order)
          return nil, errors.new("config", string.format("%s:%d: section [%s] appears twice (first at line %d): " ..
            "merge them", path, n, name, out.sections[name]._line))
        end
        out.sections[name] = { _line = n }
        out.order[#out.order + 1] = name
        current = out.sections[name]
      else
        local k, v = line:match("^([%w_%-%.]+)%s*=%s*(.-)$")
        if not k then
          return nil, errors.new("config", string.format("%s:%d: expected 'key = value'", path, n))
        end
        if not current then
          return nil, errors.new("config", string.format("%s:%d: '%s' is outside a [profile] section", path, n, k))
        end
        k = k:lower():gsub("%-", "_")
        local q = v:match('^"(.*)"$') or v:match("^'(.*)'$")
        if q then v = q end
        if not BY_NAME[k] then
          out.warnings[#out.warnings + 1] = string.format("%s:%d: unknown key '%s' (ignored)", path, n, k)
        end
        if current[k] then
          -- a repeated setting silently taking the last value is what the CLI refuses for repeated flags too
          return nil, errors.new("config", string.format("%s:%d: '%s' is set twice in this section (first at " ..
            "line %d): keep one", path, n, k, current[k].line))
        end
        current[k] = { value = v, line = n }
      end
    end
  end
  return out
end

--- Reads and parses the file at path: parsed | nil (no such file) | nil, err.
function M.load(path)
  -- a missing file is no error; one that is not a small regular file, or cannot be read, is
  local files = require "enos.files"
  local why, missing = files.not_regular(path, "profile file")
  if missing then return nil end
  if why then return nil, errors.new("config", why) end
  local text, err = files.read_small(path, "profile file")
  if not text then return nil, err end
  return M.parse(text, path)
end

--- The permission bits of a file as an octal string ("600"), or nil.
function M.file_mode(path)
  local st = require("enos.core").stat(path)
  return st and ("%o"):format(st.mode) or nil
end

--- True when the mode string gives group or others any access.
function M.open_to_others(mode)
  if not mode then return false end
  local g, o = mode:sub(-2, -2), mode:sub(-1)
  return g ~= "0" or o ~= "0"
end

local function expand_path(v, base_dir, home)
  if v:sub(1, 2) == "~/" and home then return home .. v:sub(2) end
  if v:sub(1, 1) ~= "/" and base_dir then return base_dir .. "/" .. v end
  return v
end

--- Resolves the configuration.
-- @param p {flags = {name -> value} (names as in SETTINGS, plus profile), env = table|function,
--   profile = name (a --profile flag)}
-- @return resolved {values = {name -> {value, source}}, profile, profile_source, file, file_how, file_mode,
--   file_exists, warnings, options = client options} | nil, err (kind config)
function M.resolve(p)
  p = p or {}
  local get = getter(p.env)
  local flags = p.flags or {}
  local r = { values = {}, warnings = {} }
  local profile, psource = nonempty(p.profile), "--profile"
  if not profile then profile, psource = nonempty(get("ENOS_PROFILE")), "ENOS_PROFILE" end
  local explicit = profile ~= nil
  if not profile then profile, psource = "default", "default" end
  r.profile, r.profile_source = profile, psource

  local path, how = M.config_path(get)
  r.file, r.file_how = path, how
  local section
  if path then
    local parsed, err = M.load(path)
    if err then return nil, err end
    r.file_exists = parsed ~= nil
    if parsed then
      for _, w in ipairs(parsed.warnings) do r.warnings[#r.warnings + 1] = w end
      section = parsed.sections[profile]
      if not section and explicit then
        local names = #parsed.order > 0 and table.concat(parsed.order, ", ") or "none"
        return nil, errors.new("config", string.format("profile '%s' (from %s) is not in %s (profiles: %s)",
          profile, psource, path, names), { field = "profile" })
      end
      local holds_secret = false
      for _, name in ipairs(parsed.order) do
        if parsed.sections[name].secret_key then holds_secret = true end
      end
      r.file_mode = M.file_mode(path)
      if holds_secret and M.open_to_others(r.file_mode) then
        r.warnings[#r.warnings + 1] = string.format(
          "profile file %s holds a secret key and is readable by group/others (mode %s); run: chmod 600 %s",
          path, r.file_mode, path)
      end
    elseif explicit then
      return nil, errors.new("config", string.format("profile '%s' (from %s) requested but %s does not exist",
        profile, psource, path), { field = "profile" })
    end
  elseif explicit then
    return nil, errors.new("config", "profile '" .. profile .. "' requested but no profile file location: " .. how)
  end
  local base_dir = path and path:match("^(.*)/[^/]*$")
  local home = nonempty(get("HOME"))

  for _, s in ipairs(M.SETTINGS) do
    local v, src
    if flags[s.name] ~= nil then
      v, src = flags[s.name], "flag --" .. s.flag
    elseif nonempty(get(s.env)) then
      v, src = get(s.env), "env " .. s.env
    elseif section and section[s.name] and section[s.name].value ~= "" then
      v = section[s.name].value
      if s.path then v = expand_path(v, base_dir, home) end
      src = string.format("profile [%s] %s:%d", profile, path, section[s.name].line)
    elseif s.default ~= nil then
      v, src = s.default, "default"
    end
    if v ~= nil and s.number then
      local num = tonumber(v)
      if not num or num <= 0 then
        return nil, errors.new("config", s.name .. " must be a positive number of seconds (from " .. src .. ")",
          { field = s.name })
      end
      v = num
    end
    if v ~= nil then r.values[s.name] = { value = v, source = src } end
  end
  if flags.secret_key ~= nil then
    r.warnings[#r.warnings + 1] = "--secret-key is visible to other users in the process list (ps); " ..
      "prefer ENOS_SECRET_KEY or a profile file"
  end
  local opts = {}
  for _, s in ipairs(M.SETTINGS) do
    if r.values[s.name] then opts[s.opt] = r.values[s.name].value end
  end
  r.options = opts
  return r
end

--- The client options for a table of options given from Lua (the one-shot API): the table's own values, then
-- the environment, then the profile file, then the defaults — the CLI's rule, by `resolve`. Options that are
-- not settings (transport, private_key, ...) pass through. A private key given as PEM wins over any file.
-- @tparam table opts client options (enos.client's names)
-- @param env a table or a function (default os.getenv)
-- @treturn table client options | nil, err (kind config: a bad profile file, a bad ENOS_TIMEOUT, ...)
function M.client_options(opts, env)
  opts = opts or {}
  local flags = {}
  for _, s in ipairs(M.SETTINGS) do
    if opts[s.opt] ~= nil then flags[s.name] = opts[s.opt] end
  end
  local r, err = M.resolve { flags = flags, env = env }
  if not r then return nil, err end
  local out = {}
  for k, v in pairs(opts) do out[k] = v end
  for k, v in pairs(r.options) do if out[k] == nil then out[k] = v end end
  if out.private_key ~= nil then out.private_key_file = nil end
  return out
end

--- Names of required settings that are missing from a resolved configuration.
function M.missing(r)
  local out = {}
  for _, s in ipairs(M.SETTINGS) do
    if s.required and not r.values[s.name] then out[#out + 1] = s end
  end
  return out
end

--- A value fit for display: secrets masked, access keys shortened.
function M.mask(name, v)
  if v == nil then return nil end
  v = tostring(v)
  local s = BY_NAME[name]
  if s and s.secret then return "******** (hidden)" end
  if name == "access_key" then
    if #v >= 12 then return v:sub(1, 4) .. "…" .. v:sub(-4) end
    return v:sub(1, 2) .. "…"
  end
  if name == "endpoint" then return M.redact_url(v) end
  return v
end

--- A URL as it may be shown: user information (`user:password@`) and a query (`?token=…`) replaced by
-- `<redacted>` (an endpoint must carry neither; the message says so without repeating them).
function M.redact_url(v)
  v = tostring(v)
  v = v:gsub("^(%a[%w+.-]*://)[^/?#]*@", "%1<redacted>@")
  v = v:gsub("[?#].*$", "?<redacted>")
  return v
end

return M
