-- The certificate calls of two-way TLS products (connect-service v2.0 certificates: apply, list, revoke, renew)
-- and the certificate check of the mutual-TLS device login. The simulator signs CSRs with its own CA (the
-- launcher's conf/ca.pem and ca.key, with luaossl) and keeps every certificate it issued, bound to the asset:
--   c:<HEX serial>     -> JSON record {sn (decimal), hex, assetId, cert, certStatus, issuer, subject, signDate,
--                         expireDate, revoker, revokerReason, issueAuthority, key (the public key's PEM)}
--   cs:<assetId>       -> JSON list of the asset's serials (HEX), oldest first
local util = require "enos_sim.util"
local conf = require "enos_sim.conf"
local store = require "enos_sim.store"
local devices = require "enos_sim.devices"

local M = {}

local state = ngx.shared.enos_state
local cjson = util.json

local REASONS = { [0] = true, [1] = true, [3] = true, [4] = true, [5] = true, [6] = true, [9] = true }
local P256 = "BggqhkjOPQMBBw=="       -- the prime256v1 OID in an EC PARAMETERS PEM

local function bad(msg) return { code = 99400, msg = "Invalid arguments: " .. msg } end
local function fail(e) return util.fail(e.code, e.msg) end

local ca_cert, ca_key, ca_pem
local function ca()
  if ca_cert then return ca_cert, ca_key end
  local cfg = conf.cfg
  local x509, pkey = require "openssl.x509", require "openssl.pkey"
  local f = assert(io.open(cfg.device_ca_cert, "rb"))
  ca_pem = f:read("*a")
  f:close()
  f = assert(io.open(cfg.device_ca_key, "rb"))
  local k = f:read("*a")
  f:close()
  ca_cert, ca_key = x509.new(ca_pem), pkey.new(k)
  return ca_cert, ca_key
end

-- the uppercase hex of a serial without leading zeros (as nginx's $ssl_client_serial, normalised)
local function norm_hex(h)
  h = tostring(h or ""):upper():gsub("^0+", "")
  return h
end

local function get(hex) local s = state:get("c:" .. hex) return s and cjson.decode(s) end
local function put(rec) state:set("c:" .. rec.hex, cjson.encode(rec)) end
local function serials_of(aid) local s = state:get("cs:" .. aid) return s and cjson.decode(s) or {} end

-- The record's status now: 0 valid, 1 revoked, 2 expired.
local function status_of(rec)
  if rec.certStatus == 1 then return 1 end
  if util.now_ms() > rec.expireDate then return 2 end
  return 0
end
M.status_of = status_of

local function view(rec)
  return { certSN = rec.sn, cert = rec.cert,
    certStatus = status_of(rec), issuer = rec.issuer, subject = rec.subject, signDate = rec.signDate,
    effetiveDate = rec.signDate, expireDate = rec.expireDate, revoker = rec.revoker,
    revokerReason = rec.revokerReason, issueAuthority = rec.issueAuthority }
end

-- The device a certificate call names (11404 when there is none).
local function device_of(org, args)
  local dev, err = devices.lookup(org, args)
  if not dev then
    if err.code == 99400 and err.msg:find("does not exist", 1, true) then
      return nil, { code = 11404, msg = "Device not found" }
    end
    return nil, err
  end
  return dev
end

-- Issues a certificate for `pub` (a luaossl key) and subject; returns the record.
local function issue(dev, pub, subject, days, authority, app)
  local x509, bignum, rand = require "openssl.x509", require "openssl.bignum", require "openssl.rand"
  local cacert, cakey = ca()
  -- a fresh 15-byte serial (an X.509 serial as platforms make them: far past 2^53), unique
  local sn, hex
  for _ = 1, 10 do
    local raw = rand.bytes(15)
    local b = bignum.fromBinary and bignum.fromBinary(raw) or bignum.new("0x" .. (raw:gsub(".", function(c)
      return string.format("%02x", c:byte()) end)))
    sn, hex = b:toDecimal(), norm_hex(b:toHex())
    if sn ~= "0" and not state:get("c:" .. hex) then break end
  end
  local c = x509.new()
  c:setVersion(3)
  c:setSerial(bignum.new(sn))
  c:setSubject(subject)
  c:setIssuer(cacert:getSubject())
  c:setPublicKey(pub)
  local now = ngx.time()
  c:setLifetime(now - 60, now + days * 86400)
  c:setBasicConstraints { CA = false }
  c:setBasicConstraintsCritical(true)
  c:sign(cakey)
  local t = util.now_ms()
  return { sn = sn, hex = hex, assetId = dev.assetId, cert = c:toPEM(), certStatus = 0,
    issuer = tostring(cacert:getSubject()), subject = tostring(subject), signDate = t,
    expireDate = t + days * 86400000, issueAuthority = authority, key = pub:toPEM("public"),
    applicant = app.access_key }
end

local function reply(rec)
  ca()
  ngx.ctx.raw_serials = true
  return util.ok { cert = rec.cert, caCert = ca_pem, certChainURL = "https://127.0.0.1/ca/" .. rec.hex .. ".pem",
    issueAuthority = rec.issueAuthority, certSN = rec.sn }
end

local function do_apply(_, app, org, args, body)
  local dev, err = device_of(org, args)
  if not dev then return fail(err) end
  if type(body.csr) ~= "string" or body.csr == "" then return fail(bad("csr is required")) end
  local days = body.validDay == nil and 730 or body.validDay
  local max = tonumber(conf.cfg.cert_max_valid_day) or 3650
  if type(days) ~= "number" or days < 1 or days % 1 ~= 0 then return fail(bad("validDay must be a positive integer")) end
  if days > max then return fail(bad("validDay " .. days .. " is above the product's maximum " .. max)) end
  local authority = body.issueAuthority == nil and "RSA" or body.issueAuthority
  if authority ~= "RSA" and authority ~= "ECC" then return fail(bad("issueAuthority must be RSA or ECC")) end
  local csr_mod = require "openssl.x509.csr"
  local ok, req = pcall(csr_mod.new, body.csr)
  if not ok or not req then return fail(bad("csr is not a PEM certificate signing request")) end
  local pub = req:getPublicKey()
  local ty = pub:type()
  local params = pub:getParameters()
  if authority == "RSA" then
    if ty ~= "rsaEncryption" then return fail(bad("issueAuthority RSA needs an RSA key in the csr")) end
    if #params.n:toBinary() * 8 < 2048 then return fail(bad("the csr's RSA key is shorter than 2048 bits")) end
  else
    if ty ~= "id-ecPublicKey" then return fail(bad("issueAuthority ECC needs an EC key in the csr")) end
    if not params.group:toPEM():find(P256, 1, true) then return fail(bad("the csr's EC key is not on P-256")) end
  end
  local key = pub:toPEM("public")
  local rec
  rec, err = store.locked(function()
    -- the same key in a valid certificate of another device: 11833
    for _, k in ipairs(state:get_keys(0)) do
      if k:sub(1, 2) == "c:" then
        local other = get(k:sub(3))
        if other and other.key == key and other.assetId ~= dev.assetId and status_of(other) == 0 then
          return nil, { code = 11833, msg = "The certificate is bound to another device" }
        end
      end
    end
    local r = issue(dev, pub, req:getSubject(), days, authority, app)
    put(r)
    local list = serials_of(dev.assetId)
    list[#list + 1] = r.hex
    state:set("cs:" .. dev.assetId, cjson.encode(list))
    return r
  end)
  if not rec then return fail(err) end
  return reply(rec)
end

local function do_list(_, _, org, args)
  local dev, err = device_of(org, args)
  if not dev then return fail(err) end
  local out = {}
  for _, hex in ipairs(serials_of(dev.assetId)) do
    local rec = get(hex)
    if rec then out[#out + 1] = view(rec) end
  end
  ngx.ctx.raw_serials = true
  return util.ok(util.list(out))
end

-- certSn from the body (or the query): the decimal serial -> the record's HEX
local function serial_arg(args, body)
  -- the digits as sent: a JSON number past 2^53 decodes to a double that has lost some of them
  local raw = util.body()
  local sn = raw and raw:match('"certSn"%s*:%s*"?(%d+)')
  if sn == nil then sn = body.certSn end
  if sn == nil then sn = args.certSn end
  if type(sn) == "number" then sn = string.format("%.0f", sn) end
  if type(sn) ~= "string" or not sn:match("^%d+$") then return nil end
  local bignum = require "openssl.bignum"
  return norm_hex(bignum.new(sn):toHex())
end

local function do_revoke(_, app, org, args, body)
  local dev, err = device_of(org, args)
  if not dev then return fail(err) end
  local hex = serial_arg(args, body)
  if not hex then return fail(bad("certSn is required (an integer)")) end
  local reason = body.reason
  if reason == nil then reason = tonumber(args.reason) end
  if type(reason) ~= "number" or not REASONS[reason] then return fail(bad("reason must be one of 0, 1, 3, 4, 5, 6, 9")) end
  local ok
  ok, err = store.locked(function()
    local rec = get(hex)
    if not rec then return nil, bad("certificate " .. hex .. " does not exist") end
    if rec.assetId ~= dev.assetId then return nil, bad("the certificate is not bound to this device") end
    local st = status_of(rec)
    if st == 1 then return nil, bad("the certificate is already revoked") end
    if st == 2 then return nil, bad("the certificate has expired") end
    rec.certStatus, rec.revokerReason, rec.revoker, rec.revokeDate = 1, reason, app.access_key, util.now_ms()
    put(rec)
    return true
  end)
  if not ok then return fail(err) end
  return util.ok(nil)
end

local function do_renew(_, app, org, args, body)
  local dev, err = device_of(org, args)
  if not dev then return fail(err) end
  local hex = serial_arg(args, body)
  if not hex then return fail(bad("certSn is required (an integer)")) end
  local days = body.validDay == nil and 730 or body.validDay
  if type(days) ~= "number" or days < 1 or days % 1 ~= 0 or days > (tonumber(conf.cfg.cert_max_valid_day) or 3650) then
    return fail(bad("validDay is out of range"))
  end
  local rec
  rec, err = store.locked(function()
    local old = get(hex)
    if not old or old.assetId ~= dev.assetId or status_of(old) ~= 0 then
      return nil, bad("only a valid certificate of this device can be renewed")
    end
    local x509 = require "openssl.x509"
    local c = x509.new(old.cert)
    local r = issue(dev, c:getPublicKey(), c:getSubject(), days, old.issueAuthority, app)
    put(r)
    local list = serials_of(dev.assetId)
    list[#list + 1] = r.hex
    state:set("cs:" .. dev.assetId, cjson.encode(list))
    return r
  end)
  if not rec then return fail(err) end
  return reply(rec)
end

M.ACTIONS = {
  apply = { "POST", do_apply },
  list = { "GET", do_list },
  revoke = { "POST", do_revoke },
  renew = { "POST", do_renew },
}

--- The mutual-TLS login's certificate check: the asset the client certificate is bound to, or nil, message.
function M.client_cert_asset()
  local v = ngx.var.ssl_client_verify
  if v == "NONE" or v == nil or v == "" then return nil, "client certificate required" end
  if v ~= "SUCCESS" then return nil, "client certificate not verified (" .. tostring(v) .. ")" end
  local rec = get(norm_hex(ngx.var.ssl_client_serial))
  if not rec then return nil, "client certificate unknown" end
  local st = status_of(rec)
  if st == 1 then return nil, "certificate revoked" end
  if st == 2 then return nil, "certificate expired" end
  return rec.assetId, rec.sn
end

--- Admin: the records of an asset (or every one).
function M.records(aid)
  local out = {}
  if aid then
    for _, hex in ipairs(serials_of(aid)) do
      local r = get(hex)
      if r then r.certStatus = status_of(r) out[#out + 1] = r end
    end
    return out
  end
  for _, k in ipairs(state:get_keys(0)) do
    if k:sub(1, 2) == "c:" then
      local r = get(k:sub(3))
      if r then r.certStatus = status_of(r) out[#out + 1] = r end
    end
  end
  return out
end

--- Store sanity for tests: the number of certificate records.
function M.count()
  local n = 0
  for _, k in ipairs(state:get_keys(0)) do if k:sub(1, 2) == "c:" then n = n + 1 end end
  return n
end

return M
