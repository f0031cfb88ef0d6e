--- Reading the small files a user names (private key, profile, CA bundle) without hanging or filling memory:
-- only a regular file is opened (a FIFO's open blocks, /dev/zero never ends), and only up to a size cap.
-- @module enos.files
local core = require "enos.core"
local errors = require "enos.errors"

local M = {}

--- The default size cap (bytes): keys, profiles and CA bundles are far smaller.
M.MAX_SMALL = 1024 * 1024

--- Why `path` is not a regular file of at most `max` bytes (nil when it is one, or when it does not exist:
-- `missing` is then true). `what` names the file in the message ("private key file").
function M.not_regular(path, what, max)
  local st, err = core.stat(path)
  if not st then return err and (what .. ": " .. err), true end
  if st.type ~= "file" then
    return ("%s %s is a %s, not a regular file"):format(what, path, st.type)
  end
  max = max or M.MAX_SMALL
  if st.size > max then
    return ("%s %s is %d bytes, more than the %d a %s can be"):format(what, path, st.size, max, what)
  end
  return nil
end

--- Reads a small regular file whole: text | nil, err (kind config, naming the file and why).
function M.read_small(path, what, max)
  local why = M.not_regular(path, what, max)
  if why then return nil, errors.new("config", why) end
  local f, ferr = io.open(path, "rb")
  if not f then return nil, errors.new("config", "cannot read " .. what .. ": " .. tostring(ferr)) end
  local text = f:read(max or M.MAX_SMALL)
  f:close()
  return text or ""
end

return M
