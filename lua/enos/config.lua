--- Option resolution from the environment (for the one-shot API and tools).
-- @module enos.config
local M = {}

--- Environment variables and the client options they fill.
M.ENV = {
  { "ENOS_ENDPOINT", "endpoint" },
  { "ENOS_ACCESS_KEY", "access_key" },
  { "ENOS_SECRET_KEY", "secret_key" },
  { "ENOS_ORG_ID", "org_id" },
  { "ENOS_PRIVATE_KEY_FILE", "private_key_file" },
  { "ENOS_CA_FILE", "cafile" },
}

--- Returns a copy of opts with missing client options taken from the environment.
-- `getenv` defaults to os.getenv (tests pass their own).
function M.with_env(opts, getenv)
  getenv = getenv or os.getenv
  local out = {}
  for k, v in pairs(opts or {}) do out[k] = v end
  for _, pair in ipairs(M.ENV) do
    local var, opt = pair[1], pair[2]
    if out[opt] == nil then
      local v = getenv(var)
      if v ~= nil and v ~= "" then out[opt] = v end
    end
  end
  if out.private_key ~= nil then out.private_key_file = nil end
  return out
end

return M
