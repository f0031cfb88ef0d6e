-- The C helpers of the plan reader and check: the fingerprint set (core.keyset) that keeps the duplicate
-- search flat in memory, the plain-line CSV splitter, and the JSON key counter that finds repeated keys.
-- (C-level: run under valgrind and ASan by make check's quick forms.)
local core = require "enos.core"

describe("core.keyset", function()
  it("answers add and has by content, counts distinct strings", function()
    local s = core.keyset()
    assert.is_false(s:add("pk:OLD-1"))
    assert.is_true(s:add("pk:OLD-1"))
    assert.is_false(s:add("pk:OLD-1\0"))           -- length and every byte count, NUL included
    assert.is_true(s:has("pk:OLD-1"))
    assert.is_false(s:has("pk:OLD-2"))
    assert.is_false(s:add(""))
    assert.is_true(s:has(""))
    assert.equal(3, s:count())
  end)

  it("holds 200,000 distinct keys without a false 'seen', in about 8 bytes a slot", function()
    local s = core.keyset()
    for i = 1, 200000 do
      if s:add("d::pk_demo:NEW-" .. i) then error("false match at " .. i) end
    end
    assert.equal(200000, s:count())
    for i = 1, 200000, 997 do assert.is_true(s:has("d::pk_demo:NEW-" .. i)) end
    assert.is_true(s:bytes() <= 200000 / 0.35 * 8)
    s:free()
    assert.has_error(function() s:add("x") end, "keyset: used after it was freed")
  end)
end)

describe("plan reader helpers in C", function()
  it("csv_split splits a plain line at every comma and leaves a quoted one to Lua", function()
    assert.same({ "a", " b ", "", "c" }, core.csv_split("a, b ,,c"))
    assert.same({ "" }, core.csv_split(""))
    assert.same({ "a", "" }, core.csv_split("a,"))
    assert.same({ "a\0b", "c" }, core.csv_split("a\0b,c"))
    assert.is_nil(core.csv_split('a,"b,c"'))
  end)

  it("json_key_count counts keys, not strings, escapes honoured", function()
    assert.equal(2, core.json_key_count('{"a":"x:y","b" : 1}'))
    assert.equal(2, core.json_key_count('{"a\\":":1,"b":"\\\\"}'))
    assert.equal(0, core.json_key_count('["a","b"]'))
    assert.equal(1, core.json_key_count('{"a":"unterminated'))
    assert.equal(0, core.json_key_count('"\\'))
  end)
end)
