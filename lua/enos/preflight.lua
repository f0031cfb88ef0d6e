--- The batch's preflight in bulk, read-only (`enos-replace batch PLAN --dry-run`): every row of a checked
-- plan is looked up on the platform a window at a time (one Search Device per window of rows, one per
-- window of new keys), and every row that would fail is reported with its line: the device is not found,
-- disabled or a mirror, it has the new key already, the new key is another device's; gateways are named with
-- their sub-devices. Nothing is changed. A 10,000-row plan costs about 200 calls.
-- @module enos.preflight
local plan_mod = require "enos.plan"
local bulk = require "enos.bulk"
local errors = require "enos.errors"
local workflow = require "enos.workflow"

local M = {}

--- The device fields the preflight's searches ask for.
M.PROJECTION = { "assetId", "orgId", "productKey", "deviceKey", "status", "productType" }
--- Problems (and gateway notes) kept in the report; all problems are counted.
M.MAX_LISTED = 1000

local function describe(t)
  return t.assetId and ("asset " .. t.assetId) or (t.productKey .. "/" .. t.deviceKey)
end

--- Runs the bulk preflight over a plan file (checked first: a plan with errors is refused, nothing sent).
-- opts: format, window (rows a call, default 100), sleep, read_attempts, max_retry_after, progress(p).
-- Returns report {rows, ok, problems = {{line, kind, message}…} (the rows that would fail), problem_count,
-- notes = {{line, message}…} (gateways), gateways, calls, searches, gets, halvings} | nil, err.
function M.run(client, plan, opts)
  opts = opts or {}
  local chk, cerr = require("enos.batch").checked(plan, { format = opts.format })
  if not chk then return nil, cerr end
  -- a refused key would fail every row alike: one error, before any read (the token is needed anyway)
  local authed, aerr = client:authenticate()
  if not authed and (aerr.kind == "auth" or aerr.kind == "config" or aerr.kind == "permission") then
    return nil, aerr
  end
  local report = { rows = 0, ok = 0, problems = {}, problem_count = 0, gateways = 0, notes = {},
    calls = 0, searches = 0, gets = 0, halvings = 0 }
  local function problem(line, kind, message)
    report.problem_count = report.problem_count + 1
    if #report.problems < M.MAX_LISTED then
      report.problems[#report.problems + 1] = { line = line, kind = kind, message = message }
    end
  end
  local bopts = { window = opts.window, projection = M.PROJECTION, sleep = opts.sleep,
    read_attempts = opts.read_attempts, max_retry_after = opts.max_retry_after,
    on_call = function() report.calls = report.calls + 1 end }

  -- the devices found, by assetId: a plan may name one device twice in two ways (by assetId in one row, by
  -- productKey + deviceKey in another), which only the platform can tell
  local asset_line = {}
  local function window(rows)
    local targets = {}
    for k, r in ipairs(rows) do targets[k] = r.target end
    local results, st = bulk.read(client, targets, bopts)
    report.searches, report.gets, report.halvings = report.searches + st.searches, report.gets + st.gets,
      report.halvings + st.halvings
    -- the new keys, per org and product as read: one search a window each
    local by_product, order, bad = {}, {}, {}
    for k, r in ipairs(rows) do
      local res, t = results[k], r.target
      local d = res.device
      if not d then
        local e = res.err
        if errors.is(e) and e.kind == "not_found" then problem(r.line, "not_found", "device not found (" .. describe(t) .. ")")
        else problem(r.line, errors.is(e) and e.kind or "transport", "could not read " .. describe(t) .. ": " .. tostring(e)) end
        bad[k] = true
      elseif asset_line[d.assetId] then
        problem(r.line, "invalid_argument", "the same device as line " .. asset_line[d.assetId] .. " (asset " ..
          tostring(d.assetId) .. ", named another way)")
        bad[k] = true
      elseif workflow.device_problem(d, t) then
        local kind, msg = workflow.device_problem(d, t)       -- (the checks the workflow's preflight makes)
        problem(r.line, kind, msg)
        bad[k] = true
      else
        asset_line[d.assetId] = r.line
        local pk = (t.orgId or "") .. "\0" .. tostring(d.productKey)
        if not by_product[pk] then
          by_product[pk] = { org = t.orgId, product = d.productKey, keys = {}, rows = {} }
          order[#order + 1] = pk
        end
        local g = by_product[pk]
        g.keys[#g.keys + 1] = t.newDeviceKey
        g.rows[#g.rows + 1] = k
        if d.productType == "Gateway" then
          report.gateways = report.gateways + 1
          local subs, serr = client:search_sub_devices { assetId = d.assetId, orgId = t.orgId, pageNo = 1, pageSize = 200 }
          report.calls = report.calls + 1
          r.gateway = subs and ("gateway with " .. #subs .. (#subs == 200 and "+" or "") .. " sub-device(s)")
            or ("gateway (its sub-devices could not be listed: " .. tostring(serr) .. ")")
        end
      end
    end
    for _, pk in ipairs(order) do
      local g = by_product[pk]
      local taken, terr = bulk.keys_taken(client, g.org, g.product, g.keys, bopts)
      for n, k in ipairs(g.rows) do
        local r, d = rows[k], results[k].device
        local holder = taken and taken[g.keys[n]]
        if not taken then
          problem(r.line, errors.is(terr) and terr.kind or "transport",
            "could not check that newDeviceKey " .. g.keys[n] .. " is free: " .. tostring(terr))
          bad[k] = true
        elseif holder and holder ~= d.assetId then
          problem(r.line, "conflict", "newDeviceKey " .. g.keys[n] .. " is already used by asset " .. tostring(holder) ..
            " in product " .. tostring(d.productKey))
          bad[k] = true
        end
      end
    end
    for k, r in ipairs(rows) do
      if not bad[k] then
        report.ok = report.ok + 1
        if r.gateway and #report.notes < M.MAX_LISTED then
          report.notes[#report.notes + 1] = { line = r.line, message = r.gateway ..
            ": its sub-devices are checked again after its replace" }
        end
      end
    end
    if opts.progress then opts.progress { done = report.rows, total = chk.rows, calls = report.calls } end
  end

  local reader = assert(plan_mod.open(plan, opts.format))
  local rows, size = {}, opts.window or bulk.WINDOW
  for row in reader:rows() do
    if row then
      report.rows = report.rows + 1
      rows[#rows + 1] = { line = row.line, target = assert(plan_mod.check_row(row.fields)) }
      if #rows == size then window(rows) rows = {} end
    end
  end
  reader:close()
  if #rows > 0 then window(rows) end
  table.sort(report.problems, function(a, b) return a.line < b.line end)     -- (one problem a row at most)
  return report
end

return M
