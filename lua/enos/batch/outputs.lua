--- The batch's outputs: the credentials file (the new secrets: 0600, written as rows finish, never twice
-- for one new key) and the results file (one line per row: its outcome, its error). Both are CSV or JSON
-- Lines, append-only, buffered, and written in the batch's group commits; each keeps the plan's extra
-- columns.
-- @module enos.batch.outputs
local core = require "enos.core"
local json = require "enos.json"
local plan_mod = require "enos.plan"
local journal_mod = require "enos.journal"

local M = {}

--- The credentials file's columns, in order (the plan's extra columns follow).
M.CREDENTIAL_COLUMNS = { "line", "assetId", "productKey", "deviceKey", "deviceSecret", "encryptedSecret",
  "sessionKey", "outcome" }
--- The credentials file's columns when the batch tracks sub-devices' gateways (after CREDENTIAL_COLUMNS).
M.GATEWAY_COLUMNS = { "gatewayAssetId", "gatewayProductKey", "gatewayDeviceKey" }
--- The credentials file's columns when the plan has a `csr` column: the certificate's serial and the file
-- (beside the credentials file) that holds it.
M.CERT_COLUMNS = { "certSn", "certificateFile" }
--- The results file's columns, in order (the plan's extra columns follow).
M.RESULT_COLUMNS = { "line", "target", "newDeviceKey", "assetId", "outcome", "error_kind", "error_code", "message" }

--- The format of an output: the one given, else by its name (.jsonl, .ndjson), else CSV.
function M.format_of(path, given)
  if given then return given end
  if path and (path:match("%.jsonl$") or path:match("%.ndjson$")) then return "jsonl" end
  return "csv"
end

local Out = {}
Out.__index = Out

-- An append-only output (credentials or results), 0600, buffered and flushed in groups.
local function open_out(path, columns, format, resume)
  local f, created = core.open_file(path, resume and "append" or "excl")
  if not f then
    local err = created
    if not resume and err and err:find("File exists", 1, true) then
      err = path .. " already exists: choose another file, or --resume the batch that wrote it"
    end
    return nil, err
  end
  local self = setmetatable({ path = path, f = f, buf = {}, columns = columns, format = format }, Out)
  if format == "csv" and (created or not resume) then
    local names = {}
    for _, c in ipairs(columns) do names[c] = c end
    self.buf[1] = core.csv_row(names, columns)          -- the header: each column its own name
  end
  return self
end

--- Buffers one record: a JSON line, or a CSV row of the file's columns.
-- @local
function Out:add(rec)
  if self.format == "jsonl" then
    self.buf[#self.buf + 1] = json.encode(rec) .. "\n"
  else
    -- quoted when needed; a cell a spreadsheet would evaluate (= + @ -…) gets a leading '
    self.buf[#self.buf + 1] = core.csv_row(rec, self.columns)
  end
end

--- Writes what is buffered (made durable by the batch's group commit, and at close).
-- @local
function Out:flush()
  if #self.buf == 0 then return true end
  local data = table.concat(self.buf)
  self.buf = {}
  return self.f:write(data)
end

--- Flushes, fsyncs and closes the file (once).
-- @local
function Out:close()
  if self.f then
    self:flush()
    self.f:sync()
    self.f:close()
    self.f = nil
  end
end

--- New keys already present in a credentials file (to not write a row twice on resume): set of keys.
function M.keys_in(path, format)
  local present = {}
  local f = io.open(path, "rb")
  if not f then return present end
  local header
  for line in f:lines() do
    if format == "jsonl" then
      local r = json.decode(line)
      if type(r) == "table" and r.deviceKey then present[r.deviceKey] = true end
    else
      local cells = plan_mod.split_csv(line)
      if cells then
        if not header then
          header = { n = #cells }
          for i, c in ipairs(cells) do header[c] = i end
        elseif header.deviceKey and #cells == header.n and cells[header.deviceKey] then
          present[cells[header.deviceKey]] = true
        end
      end
    end
  end
  f:close()
  return present
end


--- On resume: a credentials or results line cut by a crash or a full disk is set aside and cut, so that its
-- row is written again (from the journal) instead of counting as delivered, and nothing glues to it.
-- Returns the notes to warn with | nil, err.
function M.repair(paths)
  local notes = {}
  for _, out in ipairs(paths) do
    if out[1] then
      local note, rerr = journal_mod.repair(out[1], { label = out[2], keep_whole = false })
      if rerr then return nil, "cannot repair " .. out[1] .. ": " .. tostring(rerr) end
      if note then notes[#notes + 1] = note end
    end
  end
  return notes
end

local Outputs = {}
Outputs.__index = Outputs

--- Opens the outputs. opts: out (credentials path, or nil), format (its format), results (path),
-- extra_columns (the plan's), resume, present (new keys the credentials file already holds).
-- @treturn table outputs | nil, err
function M.open(opts)
  local self = setmetatable({ present = opts.present or {}, cred_only = false, names = {} }, Outputs)
  local extra = opts.extra_columns or {}
  local function cols(base, more)
    local c = {}
    for _, x in ipairs(base) do c[#c + 1] = x end
    for _, list in ipairs(more or {}) do for _, x in ipairs(list) do c[#c + 1] = x end end
    for _, x in ipairs(extra) do c[#c + 1] = x end
    return c
  end
  if opts.out then
    local more = {}
    if opts.gateways then more[#more + 1] = M.GATEWAY_COLUMNS end
    if opts.certificates then
      more[#more + 1] = M.CERT_COLUMNS
      self.certs = true
    end
    local r, err = open_out(opts.out, cols(M.CREDENTIAL_COLUMNS, more), M.format_of(opts.out, opts.format), opts.resume)
    if not r then return nil, err end
    self.cred = r
  end
  local r, err = open_out(opts.results, cols(M.RESULT_COLUMNS), M.format_of(opts.results), opts.resume)
  if not r then self:close() return nil, err end
  self.results = r
  return self
end

--- Delivers a row's new credentials (once per new key).
function Outputs:deliver(row, new, outcome)
  local cert_file
  if new.certificate and self.certs and self.cred then
    -- the certificate (public) in its own PEM file, named by the new key: a technician copies it onto the unit
    -- (written even when the key's credentials line is there: a resume that finished the certificate step)
    local path = M.cert_path(self.cred.path, new.deviceKey)
    local pem = new.certificate.cert .. (new.certificate.caCert and ("\n" .. new.certificate.caCert) or "")
    if require("enos.workflow").write_private(path, pem, true) then cert_file = path end
  end
  if not self.cred or self.present[new.deviceKey] then return end
  local enc = new.encrypted or {}
  local rec = {}
  for k, v in pairs(row.extra or {}) do rec[k] = v end
  rec.line, rec.assetId, rec.productKey, rec.deviceKey = row.line, new.assetId, new.productKey, new.deviceKey
  rec.deviceSecret, rec.outcome = new.deviceSecret, outcome
  if not new.deviceSecret then rec.encryptedSecret, rec.sessionKey = enc.deviceSecret, enc.sessionKey end
  if new.gateway then
    rec.gatewayAssetId, rec.gatewayProductKey, rec.gatewayDeviceKey =
      new.gateway.assetId, new.gateway.productKey, new.gateway.deviceKey
  end
  if new.certificate and self.certs then rec.certSn, rec.certificateFile = new.certificate.certSn, cert_file end
  self.cred:add(rec)
  self.present[new.deviceKey] = true
  -- a secret the journal does not hold (a clear one with no encrypted pair: V2.1) must be on disk before the
  -- journal says done: the next group commit fsyncs the credentials file too
  if rec.deviceSecret and not new.encrypted then self.cred_only = true end
end

--- The file of a certificate a batch issues, beside the credentials file: `<name>.cert-<newDeviceKey>.pem`
-- (the device's certificate, then the issuing CA's).
function M.cert_path(cred_path, new_key)
  return (cred_path:gsub("%.[%w]+$", "")) .. ".cert-" .. new_key .. ".pem"
end

--- Writes one file per gateway beside the credentials file, `<name>.gateway-<gatewayAssetId>.csv` (0600): the
-- new triples of its replaced sub-devices, so that each gateway is configured once. Read from the credentials
-- file (it holds every delivered row, this run's and earlier runs'). Returns the list of files | nil, err.
function M.gateway_files(cred_path, format)
  local by_gw, order = {}, {}
  local f = io.open(cred_path, "rb")
  if not f then return {} end
  local header
  local function add(r)
    local gw = r.gatewayAssetId
    if not gw or gw == "" then return end
    if not by_gw[gw] then by_gw[gw] = {} order[#order + 1] = gw end
    local list = by_gw[gw]
    list[#list + 1] = r
  end
  for line in f:lines() do
    if format == "jsonl" then
      local r = json.decode(line)
      if type(r) == "table" then add(r) end
    else
      local cells = plan_mod.split_csv(line)
      if cells and not header then
        header = cells
      elseif cells and #cells == #header then
        local r = {}
        for i, name in ipairs(header) do r[name] = cells[i] end
        add(r)
      end
    end
  end
  f:close()
  local cols = { "gatewayAssetId", "gatewayProductKey", "gatewayDeviceKey", "assetId", "productKey", "deviceKey",
    "deviceSecret", "encryptedSecret", "sessionKey" }
  local names = {}
  for _, c in ipairs(cols) do names[c] = c end
  local base = cred_path:gsub("%.[%w]+$", "")
  local files = {}
  table.sort(order)
  for _, gw in ipairs(order) do
    local buf = { core.csv_row(names, cols) }
    for _, r in ipairs(by_gw[gw]) do buf[#buf + 1] = core.csv_row(r, cols) end
    local path = base .. ".gateway-" .. gw:gsub("[^%w_.-]", "_") .. ".csv"
    local ok, err = require("enos.workflow").write_private(path, table.concat(buf), true)
    if not ok then return nil, err end
    files[#files + 1] = path
  end
  return files
end

--- Whether this new key needs no delivery: no credentials file was given, or it already holds the key.
function Outputs:delivered(new_key)
  return self.cred == nil or self.present[new_key] == true
end

--- Writes a row's result line.
function Outputs:result(row, outcome, assetId, e)
  local t = row.target
  local rec = {}
  for k, v in pairs(row.extra or {}) do rec[k] = v end
  rec.line, rec.target = row.line, t.assetId or (t.productKey .. "/" .. t.deviceKey)
  rec.newDeviceKey, rec.assetId, rec.outcome = t.newDeviceKey, assetId, outcome
  rec.error_kind, rec.error_code, rec.message = e and e.kind, e and e.code, e and e.message
  self.results:add(rec)
end

--- Writes what is buffered. Returns true | nil, what (the file that could not be written), err.
function Outputs:write()
  if self.cred then
    local ok, err = self.cred:flush()
    if not ok then return nil, "credentials file " .. self.cred.path, err end
  end
  local ok, err = self.results:flush()            -- a report: written as rows finish, fsynced at the end
  if not ok then return nil, "results file " .. self.results.path, err end
  return true
end

--- The credentials file to fsync with the journal's next group, when it holds a secret the journal does not
-- (then the flag is cleared); else nil.
function Outputs:take_sync()
  if not (self.cred and self.cred_only) then return nil end
  self.cred_only = false
  return self.cred.f
end

--- Writes, fsyncs and closes both files.
function Outputs:close()
  if self.cred then self.cred:close() end
  if self.results then self.results:close() end
end

return M
