--- Decryption of V2.4 device secrets under a named scheme (docs/protocol.md, encrypted secrets).
-- The cipher parameters are our inference, not published by EnOS: every part is
-- an option, and `auto` tries them all.
-- @module enos.secret
local core = require "enos.core"
local errors = require "enos.errors"

local M = {}

local OPTIONS = {
  rsa_padding = { "pkcs1", "oaep", "oaep-sha256" },
  aes_mode = { "ecb", "cbc", "gcm" },
  key_format = { "raw", "base64", "hex" },
  encoding = { "base64", "base64url", "hex" },
}
--- The parts of a scheme table and the values each may take: rsa_padding (pkcs1, oaep, oaep-sha256), aes_mode
-- (ecb, cbc, gcm), key_format (raw, base64, hex), encoding (base64, base64url, hex).
M.OPTIONS = OPTIONS

--- Named schemes.
M.SCHEMES = {
  ["enos-v2.4"] = { rsa_padding = "pkcs1", aes_mode = "ecb", key_format = "raw", encoding = "base64" },
}
--- The scheme used when none is named.
M.DEFAULT = "enos-v2.4"

local function one_of(list, v)
  for _, x in ipairs(list) do if x == v then return true end end
  return false
end

--- Resolves a scheme name or table to a full table, or "auto"; nil, err when unknown.
function M.resolve(scheme)
  if scheme == nil then scheme = M.DEFAULT end
  if scheme == "auto" then return "auto" end
  if type(scheme) == "string" then
    local s = M.SCHEMES[scheme]
    if not s then return nil, errors.arg("scheme", "unknown secret scheme '" .. scheme .. "' (enos-v2.4, auto or a table)") end
    return s
  end
  if type(scheme) ~= "table" then
    return nil, errors.arg("scheme", "secret scheme must be a name or a table")
  end
  local base = M.SCHEMES[scheme.name or M.DEFAULT] or M.SCHEMES[M.DEFAULT]
  local out = {}
  for k, list in pairs(OPTIONS) do
    local v = scheme[k]
    if v == nil then v = base[k] end
    if not one_of(list, v) then
      return nil, errors.arg("scheme." .. k, "must be one of " .. table.concat(list, ", "))
    end
    out[k] = v
  end
  return out
end

local function describe(s)
  return string.format("%s/%s/%s/%s", s.rsa_padding, s.aes_mode, s.key_format, s.encoding)
end
--- A resolved scheme as text: "rsa_padding/aes_mode/key_format/encoding".
-- @function describe
-- @tparam table s a scheme (`resolve`'s result)
M.describe = describe

local function try(key, session_key, secret, s, run)
  return (run or core.decrypt_secret)(key, session_key, secret, s.rsa_padding, s.aes_mode, s.key_format, s.encoding)
end

-- Plausible encodings for a pair of strings, cheapest test first.
local function encodings_for(a, b)
  local out = {}
  local both = a .. b
  if not both:find("[^0-9a-fA-F]") and #a % 2 == 0 and #b % 2 == 0 then out[#out + 1] = "hex" end
  if not both:find("[^A-Za-z0-9+/=%s]") then out[#out + 1] = "base64" end
  if not both:find("[^A-Za-z0-9_%-=]") then out[#out + 1] = "base64url" end
  return out
end

--- Decrypts with one scheme or `auto`. `run` (optional) replaces core.decrypt_secret for a named
-- scheme, e.g. a scheduler's decrypt that does the work in a worker thread.
-- @return plaintext, scheme_table | nil, err (kind "decrypt")
function M.decrypt(key, session_key, secret, scheme, run)
  local s, err = M.resolve(scheme)
  if not s then return nil, err end
  if type(session_key) ~= "string" or session_key == "" then
    return nil, errors.new("decrypt", "sessionKey is missing")
  end
  if type(secret) ~= "string" or secret == "" then
    return nil, errors.new("decrypt", "deviceSecret is missing")
  end
  if s ~= "auto" then
    local pt, why = try(key, session_key, secret, s, run)
    if not pt then return nil, errors.new("decrypt", tostring(why) .. " (scheme " .. describe(s) .. ")") end
    return pt, s
  end
  -- auto: accept only a single distinct plaintext whose padding or tag verifies.
  local found, found_scheme, count = nil, nil, 0
  for _, enc in ipairs(encodings_for(session_key, secret)) do
    for _, pad in ipairs(OPTIONS.rsa_padding) do
      for _, kf in ipairs(OPTIONS.key_format) do
        for _, mode in ipairs(OPTIONS.aes_mode) do
          local cand = { rsa_padding = pad, aes_mode = mode, key_format = kf, encoding = enc }
          local pt = try(key, session_key, secret, cand)
          if pt then
            if found == nil then
              found, found_scheme, count = pt, cand, 1
            elseif pt ~= found then
              count = count + 1
            end
          end
        end
      end
    end
  end
  if count == 1 then return found, found_scheme end
  if count > 1 then
    return nil, errors.new("decrypt", "auto: more than one scheme gives a plausible secret; name the scheme")
  end
  return nil, errors.new("decrypt", "auto: no known scheme decrypts this secret with this private key")
end

--- Loads a private key from PEM text or {file = path}. Returns key | nil, err.
function M.load_private_key(src)
  local pem
  if type(src) == "table" and src.file ~= nil then
    if type(src.file) ~= "string" or src.file == "" then
      return nil, errors.new("config", "private key file must be a path", { field = "file" })
    end
    -- (a regular file only, and small: a FIFO or /dev/zero would block or read forever)
    local err
    pem, err = require("enos.files").read_small(src.file, "private key file")
    if not pem then err.field = "file" return nil, err end
  elseif type(src) == "string" then
    pem = src
  else
    return nil, errors.arg("private_key", "must be PEM text or {file = path}")
  end
  local key, why = core.load_private_key(pem)
  if not key then return nil, errors.new("config", "private key: " .. why, { field = "private_key" }) end
  return key
end

--- True when v is a key object.
function M.is_key(v)
  return core.is_key(v)
end

return M
