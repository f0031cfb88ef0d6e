-- One validation of a target (enos.target): the client, the workflow, the plan and the CLI refuse the same
-- values with the same words (the CLI naming its flags), before any request.
local enos = require "enos"
local target = require "enos.target"
local plan = require "enos.plan"
local workflow = require "enos.workflow"
local cli = require "enos.cli"
local H = require "helpers"

local FLAGS = { assetId = "--asset-id", productKey = "--product-key", deviceKey = "--device-key",
  newDeviceKey = "--new-key" }

local CASES = {
  { "an empty assetId", { assetId = "", newDeviceKey = "NEW-0001" }, "assetId must not be empty" },
  { "a control character", { assetId = "A\0001", newDeviceKey = "NEW-0001" }, "assetId contains control characters" },
  { "a zero-width space", { assetId = "A\226\128\139B", newDeviceKey = "NEW-0001" }, "invisible" },
  { "65 bytes", { assetId = ("x"):rep(65), newDeviceKey = "NEW-0001" }, "assetId is longer than 64 bytes" },
  { "bad UTF-8", { productKey = "pk\255", deviceKey = "OLD-1", newDeviceKey = "NEW-0001" }, "productKey is not valid UTF-8" },
  { "both ways", { assetId = "A1", productKey = "pk", newDeviceKey = "NEW-0001" },
    "give either assetId or productKey with deviceKey, not both" },
  { "no device", { newDeviceKey = "NEW-0001" }, "which device? give assetId, or productKey with deviceKey" },
  { "a product alone", { productKey = "pk", newDeviceKey = "NEW-0001" }, "deviceKey is required with productKey" },
  { "a key alone", { deviceKey = "OLD-1", newDeviceKey = "NEW-0001" }, "productKey is required with deviceKey" },
  { "a short new key", { assetId = "A1", newDeviceKey = "ab" }, "newDeviceKey must be 4-64 characters" },
  { "a new key with a space", { assetId = "A1", newDeviceKey = "NEW 0001" }, "newDeviceKey must be 4-64 characters" },
  { "no new key", { assetId = "A1" }, "newDeviceKey is required" },
  { "the same key", { productKey = "pk", deviceKey = "SAME-1", newDeviceKey = "SAME-1" },
    "newDeviceKey equals the current deviceKey" },
}

local function flagged(msg)
  for k, f in pairs(FLAGS) do msg = msg:gsub("%f[%w]" .. k .. "%f[^%w]", f) end
  return msg
end

describe("one target validation", function()
  local stub, client
  before_each(function()
    stub = H.stub(function() error("no request may be sent") end)
    client = assert(enos.client { endpoint = "https://gw.example.com", access_key = "ak", secret_key = "sk",
      org_id = "o1", transport = stub })
  end)

  for _, case in ipairs(CASES) do
    local name, t, want = case[1], case[2], case[3]
    it(name .. ": the same refusal everywhere, nothing sent", function()
      local ok, msg, field = target.check(t)
      assert.is_nil(ok)
      assert.truthy(msg:find(want, 1, true), msg)
      assert.is_string(field)
      -- the plan's row check
      local r, pmsg = plan.check_row(t)
      assert.is_nil(r)
      assert.equal(msg, pmsg)
      -- the workflow
      local rep, err = workflow.replace(client, t)
      assert.is_nil(rep)
      assert.equal("invalid_argument", err.kind)
      assert.equal(msg, err.message)
      assert.equal(field, err.field)
      -- the client (a replace checks the device and its new key; the same-key check needs the device read)
      if not msg:find("equals the current", 1, true) then
        local params = {}
        for k, v in pairs(t) do params[k] = v end
        local res, cerr = client:replace_device(params)
        assert.is_nil(res)
        assert.equal(msg, cerr.message)
      end
      -- the CLI, naming its flags
      local args = { "device", "--yes" }
      for k, f in pairs(FLAGS) do if t[k] then args[#args + 1] = f args[#args + 1] = t[k] end end
      local e = {}
      local code = cli.main { argv = args, env = function() return nil end, isatty = false,
        stdout = function() end, stderr = function(s) e[#e + 1] = s end, stdin = function() end }
      assert.equal(2, code)
      assert.truthy(table.concat(e):find(flagged(msg), 1, true), table.concat(e) .. " / " .. flagged(msg))
      assert.equal(0, #stub:api_requests())
    end)
  end

  it("a read needs no new key; a workflow target with an unknown field is refused", function()
    assert.is_table(target.check({ assetId = "A1" }, { new_key = false }))
    local _, msg, field = target.check({ assetId = "A1", newDeviceKey = "NEW-0001", assetID = "x" }, { unknown = "refuse" })
    assert.equal("unknown target field 'assetID'", msg)
    assert.equal("assetID", field)
  end)
end)
