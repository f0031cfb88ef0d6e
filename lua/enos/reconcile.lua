--- Reconciling a replace whose outcome was not seen (a timeout, a dropped connection, a crash after the
-- request left): read the device back and judge what it shows. One implementation for one device (the
-- workflow, after an unknown outcome) and for a window of rows (a batch's resume, its --reverify): the same
-- judgement, and the same reads, in bulk when there are many.
--
-- What a read-back can say, for a replace that asked `want` = {assetId?, productKey?, newDeviceKey, old_key?}:
--
-- * "replaced": the device shows the new key (the replace happened; its secret may still be missing)
-- * "unchanged": it shows the old key (or, when the old key is unknown, any other key than the new one)
-- * "elsewhere": it shows a third key (someone else changed it)
-- * "other": another device answered the read (teaches nothing; read again)
-- @module enos.reconcile
local bulk = require "enos.bulk"

local M = {}

--- Whether the new secret of `new` (a reply or a device read) is in hand: clear when the client can decrypt
-- (or on V2.1, where it comes clear), else at least its encrypted pair when one was asked for.
function M.secret_in_hand(client, require_secret, new)
  if not new then return false end
  local clear = type(new.deviceSecret) == "string" and new.deviceSecret ~= ""
  if client.api_version == "v2.1" or (require_secret and client:has_private_key()) then return clear end
  if not require_secret then return true end
  local e = new.encrypted
  return type(e) == "table" and type(e.deviceSecret) == "string" and e.deviceSecret ~= ""
    and type(e.sessionKey) == "string" and e.sessionKey ~= ""
end

--- Judges a device read back against what the replace asked for.
-- @tparam table d the device read (Get Device or Search Device fields)
-- @tparam table want {assetId?, productKey?, newDeviceKey, old_key?}
-- @treturn string "replaced" | "unchanged" | "elsewhere" | "other"
function M.judge(d, want)
  if (want.assetId and d.assetId ~= want.assetId) or (want.productKey and d.productKey ~= want.productKey) then
    return "other"
  end
  if d.deviceKey == want.newDeviceKey then return "replaced" end
  if want.old_key == nil or d.deviceKey == want.old_key then return "unchanged" end
  return "elsewhere"
end

-- The identity a row is read by: its asset when known (the plan's, else the journal's), else the device in
-- its product that holds the new key (a replace that happened shows there).
local function read_target(item)
  local t = item.target
  local asset = t.assetId or item.assetId
  if asset then return { assetId = asset, orgId = t.orgId }, asset end
  return { productKey = t.productKey, deviceKey = t.newDeviceKey, orgId = t.orgId }, nil
end

-- One item's verdict from one read: "done", d | "not_done", d? | nil (unclear: read again).
local function verdict(client, item, d, err, o)
  local _, asset = read_target(item)
  local t = item.target
  if d then
    local j = M.judge(d, { assetId = asset, productKey = t.productKey, newDeviceKey = t.newDeviceKey })
    if j == "other" then return nil end
    if j ~= "replaced" then return "not_done", d end
    if M.secret_in_hand(client, o.require_secret, d) then return "done", d end
    return nil                                  -- the new key, but no usable secret yet: read again
  end
  -- (a refused read by asset is no proof of absence: read again)
  if err and err.kind == "not_found" and not (asset and err.code == 99400) then return "not_done" end
  return nil
end

--- Reads back a window of rows whose replace may have happened, and says for each whether it is done.
-- items: {target = {assetId?, productKey?, deviceKey?, newDeviceKey, orgId?}, assetId? (the journal's)}.
-- opts: require_secret, read_attempts, window, sleep(seconds),
-- pause(attempt) (between the lone reads of a row still unclear), max_retry_after.
-- The window is read in bulk (Search Device, with the secret when wanted); a row the bulk read leaves unclear
-- (missing, another device, the new key without a usable secret, a failed read) is read alone with Get Device,
-- up to read_attempts times.
-- @treturn table verdicts[i] = {state = "done", device = d} (the new key, secret in hand) | {state =
-- "not_done", device = d?} (safe to run: the device, when read, is its current record) | {state = "unclear"}
-- (cannot be told: resume again)
function M.window(client, items, opts)
  local o = opts or {}
  local attempts = o.read_attempts or 8
  local targets = {}
  for i, item in ipairs(items) do targets[i] = (read_target(item)) end
  local out = {}
  local res = #items > 1 and bulk.read(client, targets, { window = o.window, require_secret = o.require_secret,
    sleep = o.sleep, read_attempts = o.read_attempts, max_retry_after = o.max_retry_after, search_only = true }) or {}
  for i, item in ipairs(items) do
    local r = res[i]
    local state, d = verdict(client, item, r and r.device, r and r.err, o)
    -- unclear after the bulk read: alone, with Get Device, a bounded number of times
    local attempt = 0
    while not state and attempt < attempts do
      attempt = attempt + 1
      if attempt > 1 and o.pause then o.pause(attempt - 1) end
      local one = bulk.read(client, { targets[i] }, { window = 1, search = false, require_secret = o.require_secret,
        sleep = o.sleep, read_attempts = 1, max_retry_after = o.max_retry_after })
      state, d = verdict(client, item, one[1] and one[1].device, one[1] and one[1].err, o)
    end
    out[i] = { state = state or "unclear", device = d }
  end
  return out
end

return M
