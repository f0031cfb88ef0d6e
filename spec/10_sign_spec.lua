-- Signing, token encryption and query encoding (docs/protocol.md, signing).
local enos = require "enos"
local core = require "enos.core"

describe("enos.sha256_hex", function()
  it("matches the standard vector", function()
    assert.equal("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", enos.sha256_hex("abc"))
    assert.equal("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", enos.sha256_hex(""))
  end)
end)

describe("enos.token_encryption", function()
  it("matches the signing test vector (docs/protocol.md)", function()
    assert.equal("4a402ff72d4644a3b5cbbb173ccd04a2b6d8be85bf522780b8626ca800e90545",
      enos.token_encryption("5acb82e7-a11e-4300-9164-c8b20b638e8b", 1572574909697, "my-app-secret"))
  end)
  it("takes the timestamp as a string too", function()
    assert.equal("4a402ff72d4644a3b5cbbb173ccd04a2b6d8be85bf522780b8626ca800e90545",
      enos.token_encryption("5acb82e7-a11e-4300-9164-c8b20b638e8b", "1572574909697", "my-app-secret"))
  end)
  it("rejects a fractional or non-numeric timestamp", function()
    assert.has_error(function() enos.token_encryption("ak", 1.5, "sk") end)
    assert.has_error(function() enos.token_encryption("ak", "12ab", "sk") end)
  end)
end)

describe("enos.signature", function()
  local vector = {
    access_token = "tokenABC", app_secret = "my-app-secret", timestamp = 1700000000000,
    query = { action = "replaceDevice", orgId = "o15520323695671", assetId = "Nmw9npSq" },
    body = '{"newDeviceKey":"dev_new_01","requireSecret":true}',
  }
  it("matches the replaceDevice signing test vector (docs/protocol.md)", function()
    assert.equal("1b9c8339746b855a9e4fd56ebb82900d6d90c482560391920b09786426ad448e", enos.signature(vector))
  end)
  it("hashes token .. sorted name/value pairs .. body .. T .. SK", function()
    local expect = enos.sha256_hex("tokenABCactionreplaceDeviceassetIdNmw9npSqorgIdo15520323695671"
      .. vector.body .. "1700000000000my-app-secret")
    assert.equal(expect, enos.signature(vector))
  end)
  it("signs a GET (no body) over the query alone", function()
    local s = enos.signature { access_token = "t", app_secret = "s", timestamp = 5, query = { b = "2", a = "1" } }
    assert.equal(enos.sha256_hex("ta1b25s"), s)
  end)
  it("sorts names by byte order (upper case before lower case)", function()
    local s = enos.signature { access_token = "t", app_secret = "s", timestamp = 1,
      query = { b = "1", B = "2", a = "3", aa = "4" } }
    assert.equal(enos.sha256_hex("tB2a3aa4b11s"), s)
  end)
  it("changes when one body byte changes", function()
    local v2 = {}
    for k, v in pairs(vector) do v2[k] = v end
    v2.body = vector.body:gsub("01", "02")
    assert.not_equal(enos.signature(vector), enos.signature(v2))
  end)
  it("writes booleans and integers as the wire does", function()
    local a = enos.signature { access_token = "t", app_secret = "s", timestamp = 1, query = { requireSecret = true, n = 7 } }
    assert.equal(enos.sha256_hex("tn7requireSecrettrue1s"), a)
  end)
end)

describe("core.sign_query", function()
  it("gives signature() and encode_query() of the same query in one call", function()
    local q = { action = "replaceDevice", orgId = "o15520323695671", assetId = "Nmw9npSq" }
    local sig, qs = core.sign_query("tokenABC", "my-app-secret", q, '{"newDeviceKey":"dev_new_01","requireSecret":true}',
      1700000000000)
    assert.equal("1b9c8339746b855a9e4fd56ebb82900d6d90c482560391920b09786426ad448e", sig)
    assert.equal("action=replaceDevice&assetId=Nmw9npSq&orgId=o15520323695671", qs)
  end)
  it("agrees with them for many parameters and long values (past the stack buffers)", function()
    for _, n in ipairs { 0, 1, 16, 17, 40 } do
      local q = {}
      for i = 1, n do q[("k%02d"):format(i)] = ("v"):rep(i * 7) .. " &=é" end
      local body = n == 40 and ("b"):rep(3000) or nil
      local sig, qs = core.sign_query("t", "s", q, body, 12345)
      assert.equal(core.signature("t", "s", q, body, 12345), sig)
      assert.equal(core.encode_query(q), qs)
      local parts = { "t" }
      local names = {}
      for k in pairs(q) do names[#names + 1] = k end
      table.sort(names)
      for _, k in ipairs(names) do parts[#parts + 1] = k .. q[k] end
      parts[#parts + 1] = (body or "") .. "12345s"
      assert.equal(enos.sha256_hex(table.concat(parts)), sig)
    end
  end)
  it("refuses what signature refuses", function()
    assert.has_error(function() core.sign_query("t", "s", { a = 1 }, nil, 1) end)
    assert.has_error(function() core.sign_query("t", "s", {}, nil, -1) end)
  end)
end)

describe("query encoding", function()
  it("percent-encodes values that need it and signs the decoded values", function()
    local q = { expression = "deviceKey = 'a b'", k = "x&y=z+w", u = "é" }
    local qs = core.encode_query(q)
    assert.equal("expression=deviceKey%20%3D%20%27a%20b%27&k=x%26y%3Dz%2Bw&u=%C3%A9", qs)
    -- a server decodes the wire form back to the exact values the signature used
    assert.same(q, core.parse_query(qs))
    local sig = enos.signature { access_token = "t", app_secret = "s", timestamp = 1, query = q }
    assert.equal(enos.sha256_hex("texpressiondeviceKey = 'a b'kx&y=z+wué1s"), sig)
  end)
  it("keeps RFC 3986 unreserved characters", function()
    assert.equal("AZaz09-_.~", core.urlencode("AZaz09-_.~"))
    assert.equal("%20%2B%2F%3F%25", core.urlencode(" +/?%"))
  end)
  it("parse_query reads '+' as a space and rejects bad escapes and repeats", function()
    assert.same({ a = "x y", b = "" }, core.parse_query("?a=x+y&b"))
    assert.is_nil(core.parse_query("a=%zz"))
    assert.is_nil(core.parse_query("a=%4"))
    local t, err = core.parse_query("a=1&a=2")
    assert.is_nil(t)
    assert.matches("repeated", err)
  end)
  it("the client puts the encoded query on the URL and signs decoded values", function()
    local H = require "helpers"
    local stub = H.stub(function() return H.envelope({}, 0) end)
    local c = assert(enos.client { endpoint = "https://gw.example.com", access_key = "ak", secret_key = "sk",
      org_id = "o1", transport = stub, clock = H.clock().fn })
    assert(c:request { path = "/x", query = { expression = "a b&c" } })
    local req = stub:api_requests()[1]
    assert.equal("https://gw.example.com/x?expression=a%20b%26c&orgId=o1", req.url)
    local sig = enos.signature { access_token = req.headers["apim-accesstoken"], app_secret = "sk",
      timestamp = req.headers["apim-timestamp"], query = { expression = "a b&c", orgId = "o1" } }
    assert.equal(sig, req.headers["apim-signature"])
  end)
end)

describe("query and header edge cases", function()
  it("refuses an empty query parameter name (it could not be parsed back)", function()
    assert.has_error(function() core.encode_query { [""] = "v" } end)
    assert.has_error(function() enos.signature { access_token = "t", app_secret = "s", timestamp = 1, query = { [""] = "v" } } end)
  end)
  it("ignores obsolete folded header lines instead of making a header of them", function()
    local h = core.parse_headers("X-A: 1\r\n folded: no\r\nX-B: 2\r\n")
    assert.same({ ["x-a"] = "1", ["x-b"] = "2" }, h)
  end)
end)
