--- The blocking libcurl transport (one easy handle, kept alive).
-- @module enos.transport.curl
local core = require "enos.core"

local M = {}

--- Creates a transport: {timeout, connect_timeout, cafile, capath, verify_tls, user_agent, max_body}.
function M.new(opts)
  return core.easy(opts or {})
end

return M
