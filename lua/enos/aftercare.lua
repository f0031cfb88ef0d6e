--- After the replace: the steps that finish a swap on the platform beyond the new key and secret.
--
-- * `link`: a sub-device keeps its link to its gateway (Get Gateway; Add Sub-Device when the replace dropped it).
-- * `certificates`: for a two-way TLS product, every valid certificate of the asset (the old unit's) is revoked
--   as superseded, then one is issued for the new unit's CSR.
-- * `tag`: the asset is stamped with tags (Update Device), so the swap can be found on the platform later.
--
-- Each step reads before it writes, so running it again after a crash does what is left, and nothing twice:
-- a certificate is never revoked without being listed as valid first, and one issued by an earlier run is kept
-- when its serial was recorded (`keep`).
-- @module enos.aftercare
local core = require "enos.core"
local errors = require "enos.errors"

local M = {}

--- The issuing authority a CSR's key asks for: "RSA" (RSA 2048 or more) | "ECC" (EC P-256), or nil, message.
-- @tparam string pem the CSR's PEM text
-- @return authority, info ({key, bits, curve, subject}) | nil, message
function M.check_csr(pem)
  if type(pem) ~= "string" then return nil, "the CSR must be PEM text" end
  if pem:find("PRIVATE KEY-----", 1, true) then
    return nil, "the file holds a private key: give the new unit's certificate signing request (CSR) only; " ..
      "the key stays on the device"
  end
  if not pem:find("-----BEGIN CERTIFICATE REQUEST-----", 1, true) then
    return nil, "not a PEM certificate signing request (no BEGIN CERTIFICATE REQUEST line)"
  end
  local info, why = core.csr_info(pem)
  if not info then return nil, why end
  if info.key == "RSA" then
    if info.bits < 2048 then return nil, "its RSA key has " .. info.bits .. " bits; EnOS takes 2048 or more" end
    return "RSA", info
  elseif info.key == "EC" then
    if info.curve ~= "prime256v1" and info.curve ~= "P-256" then
      return nil, "its EC key is on curve " .. tostring(info.curve) .. "; EnOS takes P-256 (prime256v1)"
    end
    return "ECC", info
  end
  return nil, "its key is neither RSA nor EC (EnOS takes RSA 2048 or EC P-256)"
end

--- The largest CSR file read (a CSR is a few KiB).
M.CSR_MAX = 65536

--- Reads and checks a CSR file: pem, authority | nil, message (naming the file). Only a regular file of at most
-- CSR_MAX bytes is read (a device such as /dev/zero, a FIFO or a directory is refused without reading it).
function M.read_csr(path)
  local st = core.stat(path)
  if not st then return nil, "cannot read CSR " .. path .. " (no such file)" end
  if st.type ~= "file" then return nil, "CSR " .. path .. " is a " .. st.type .. ", not a file" end
  if st.size > M.CSR_MAX then return nil, "CSR " .. path .. " is larger than 64 KiB: not a CSR" end
  local f, ferr = io.open(path, "rb")
  if not f then return nil, "cannot read CSR " .. path .. " (" .. tostring(ferr) .. ")" end
  local pem = f:read(M.CSR_MAX + 1) or ""
  f:close()
  local authority, why = M.check_csr(pem)
  if not authority then return nil, "CSR " .. path .. ": " .. why end
  return pem, authority
end

-- A read, retried by the caller's `read` wrapper when given (the workflow's backoff), else sent once.
local function read(o, fn, ...)
  if o.read then return o.read(fn, ...) end
  return fn(...)
end

-- The short view of a gateway: {assetId, productKey, deviceKey}.
local function gw_view(g)
  return { assetId = g.assetId, productKey = g.productKey, deviceKey = g.deviceKey }
end

--- The gateway a device connects through: {assetId, productKey, deviceKey, status} | false (none) | nil, err.
function M.gateway_of(client, asset_id, org, o)
  -- (wrapped: "no gateway" is an answer, not a failed read to retry)
  local r, err = read(o or {}, function()
    local g, e = client:get_gateway { assetId = asset_id, orgId = org }
    if g == nil then return nil, e end
    return { g = g }
  end)
  if not r then return nil, err end
  local g = r.g
  if not g then return false end
  local v = gw_view(g)
  v.status = g.status
  return v
end

--- Checks that a sub-device is still linked to `gw` (the gateway the preflight found) and links it again
-- when the replace dropped the link. Returns {relinked = bool} | nil, err.
function M.link(client, asset_id, org, gw, o)
  o = o or {}
  local now, err = M.gateway_of(client, asset_id, org, o)
  if now == nil then return nil, err end
  if now and now.assetId == gw.assetId then return { relinked = false } end
  if now then
    return nil, errors.new("conflict", "sub-device " .. asset_id .. " is now behind gateway " .. now.assetId ..
      ", not " .. gw.assetId .. " as before the replace; its link was left as it is")
  end
  local ok, aerr = client:add_sub_devices { assetId = gw.assetId, orgId = org, subDevices = { { assetId = asset_id } } }
  if not ok then
    aerr.message = "the replace dropped the link to gateway " .. gw.assetId .. " and adding it back failed: " ..
      tostring(aerr.message)
    return nil, aerr
  end
  now, err = M.gateway_of(client, asset_id, org, o)
  if now == nil then return nil, err end
  if not (now and now.assetId == gw.assetId) then
    return nil, errors.new("server", "the link to gateway " .. gw.assetId .. " was added back but Get Gateway " ..
      "does not show it")
  end
  return { relinked = true }
end

--- The valid certificates of a device (certStatus 0): list | nil, err.
function M.valid_certificates(client, asset_id, org, o)
  local list, err = read(o or {}, client.list_certificates, client, { assetId = asset_id, orgId = org })
  if not list then return nil, err end
  local valid = {}
  for _, c in ipairs(list) do
    if tonumber(c.certStatus) == 0 then valid[#valid + 1] = c end
  end
  return valid
end

--- The certificate swap: lists the asset's certificates, revokes every valid one (superseded) except the new
-- unit's (one that certifies the CSR's key, `o.key_sha256`, or whose serial is in `o.keep`: issued by an earlier
-- run), then applies for one with `o.csr` unless the new unit's is still valid. `o.on_issued(cert)` is called as
-- soon as a certificate is issued (the batch journals it).
-- Options: csr, key_sha256 (check_csr's info), authority (RSA | ECC), valid_day, keep (set of serials), reason
-- (default 4), read, on_issued.
-- @return {revoked = {serials}, cert = {certSn, cert, caCert, issueAuthority, certChainURL}, reused = bool}
--   | nil, err (err.partial: what was done before the failure)
function M.certificates(client, asset_id, org, o)
  local done = { revoked = {} }
  local valid, err = M.valid_certificates(client, asset_id, org, o)
  if not valid then return nil, err end
  local keep = o.keep or {}
  for _, c in ipairs(valid) do
    -- a valid certificate of the new unit's key was issued by an earlier run (the same CSR): kept, not revoked
    local info = o.key_sha256 and type(c.cert) == "string" and core.cert_info(c.cert)
    if keep[c.certSn] or (info and info.key_sha256 == o.key_sha256) then
      done.cert = done.cert or { certSn = c.certSn, cert = c.cert, issueAuthority = c.issueAuthority }
      done.reused = true
    else
      local ok, rerr = client:revoke_certificate { assetId = asset_id, orgId = org, certSn = c.certSn,
        reason = o.reason or 4 }
      if not ok then
        rerr.message = "revoking certificate " .. c.certSn .. " failed: " .. tostring(rerr.message)
        rerr.partial = done
        return nil, rerr
      end
      done.revoked[#done.revoked + 1] = c.certSn
    end
  end
  if not done.cert and o.csr then
    local c, aerr = client:apply_certificate { assetId = asset_id, orgId = org, csr = o.csr,
      validDay = o.valid_day, issueAuthority = o.authority }
    if not c then
      aerr.message = "issuing the new unit's certificate failed: " .. tostring(aerr.message)
      aerr.partial = done
      return nil, aerr
    end
    done.cert = { certSn = c.certSn, cert = c.cert, caCert = c.caCert, issueAuthority = c.issueAuthority,
      certChainURL = c.certChainURL }
    if o.on_issued then o.on_issued(done.cert) end
  end
  return done
end

--- A tag key's problem, or nil (a key must be usable in a search expression: `deviceTags.<key> = '…'`).
function M.tag_problem(k, v)
  if type(k) ~= "string" or not k:match("^[%a_][%w_]*$") or #k > 64 then
    return "tag name " .. tostring(k) .. " must be letters, digits and _ (not starting with a digit), at most 64"
  end
  if type(v) ~= "string" or #v > 256 or v:find("[%z\1-\31\127'\"]") or not require("enos.json").valid_utf8(v) then
    return "tag " .. k .. ": the value must be printable UTF-8 text of at most 256 bytes without quotes"
  end
  return nil
end

--- The tags to stamp: `tags` plus, when `stamp`, replacedAt (ISO 8601 UTC of `at_ms`) and replacedFrom (the old
-- device key).
function M.stamp_tags(tags, stamp, at_ms, old_key)
  local out = {}
  for k, v in pairs(tags or {}) do out[k] = v end
  if stamp then
    out.replacedAt = os.date("!%Y-%m-%dT%H:%M:%SZ", math.floor((at_ms or core.now_ms()) / 1000))
    out.replacedFrom = old_key
  end
  return out
end

--- Stamps the asset with `tags` (merged into the tags it has: Update Device's deviceTags replaces the whole
-- map). `dev` is the device as last read (deviceName, timezone, deviceTags); without them it is read first.
-- Returns {updated = bool (false: the tags were already there)} | nil, err.
function M.tag(client, asset_id, org, tags, dev, o)
  o = o or {}
  if not (dev and dev.deviceName and dev.timezone) then
    local err
    dev, err = read(o, client.get_device, client, { assetId = asset_id, orgId = org })
    if not dev then return nil, err end
  end
  local merged, same = {}, true
  if type(dev.deviceTags) == "table" then
    for k, v in pairs(dev.deviceTags) do merged[k] = v end
  end
  for k, v in pairs(tags) do
    if merged[k] ~= v then same = false end
    merged[k] = v
  end
  if same then return { updated = false } end
  local name = dev.deviceName
  if type(name) ~= "table" then name = { defaultValue = tostring(name or asset_id), i18nValue = {} } end
  local ok, err = client:update_device { assetId = asset_id, orgId = org, deviceName = name,
    timezone = dev.timezone, deviceTags = merged }
  if not ok then
    err.message = "tagging the asset failed: " .. tostring(err.message)
    return nil, err
  end
  return { updated = true }
end

return M
