--- Batch plans: streamed CSV (with a header) or JSON Lines, row by row, with
-- every row validated and the whole plan checked for duplicates.
-- @module enos.plan
local core = require "enos.core"
local json = require "enos.json"
local target_mod = require "enos.target"

local M = {}

local KNOWN = { assetId = true, productKey = true, deviceKey = true, newDeviceKey = true, orgId = true }
--- The plan's own columns (a set); any other column is an extra, carried into the outputs.
M.KNOWN = KNOWN

local tointeger = math.tointeger       -- (nil on Lua 5.1/LuaJIT, where 7.0 prints as 7 anyway)

--- Bytes in a carried-through (extra) cell.
M.MAX_EXTRA = 1024
--- Bytes in one plan record (a quoted CSV field's line breaks included).
M.MAX_LINE = 65536
--- Bytes in a column (or JSONL field) name.
M.MAX_NAME = 128
--- Distinct extra columns (JSONL fields) carried into the outputs.
M.MAX_EXTRA_COLUMNS = 64

--- Names the batch's outputs use for their own columns (credentials and results files): a plan column of the
-- same name would give an output two columns of one name and put the plan's value where ours belongs.
M.RESERVED = { line = true, deviceSecret = true, encryptedSecret = true, sessionKey = true, outcome = true,
  target = true, error_kind = true, error_code = true, message = true }

-- The known columns by lower case, to catch a spreadsheet's `DeviceKey` for `deviceKey`.
local KNOWN_LOWER = {}
for k in pairs(KNOWN) do KNOWN_LOWER[k:lower()] = k end

local function excerpt(v, n)
  n = n or 40
  v = tostring(v):gsub("[%z\1-\31\127]", "?")
  if #v > n then v = v:sub(1, n) .. "…" end
  return v
end
--- A short, printable excerpt of untrusted text for a message: control characters become `?`, cut at `n`
-- bytes (default 40).
-- @function excerpt
-- @param v the text (any value: tostring)
-- @tparam[opt=40] number n
M.excerpt = excerpt

-- A column or field name: short, printable, not one of ours, not a known column in another case.
-- Returns nil | message.
local function check_name(name)
  if type(name) ~= "string" then return "a field name that is not a string" end
  if name == "" then return "an empty column name" end
  if #name > M.MAX_NAME then return ("a column name longer than %d bytes (%s)"):format(M.MAX_NAME, excerpt(name)) end
  if name:find("[%z\1-\31\127]") then return "column name " .. excerpt(name) .. " contains control characters" end
  if KNOWN[name] then return nil end
  if M.RESERVED[name] then
    return ("column %s is a name the batch's output files use for their own column; rename it"):format(name)
  end
  local known = KNOWN_LOWER[name:lower()]
  if known then return ("column %s: did you mean %s? (names are case-sensitive)"):format(name, known) end
  return nil
end

local valid_utf8 = json.valid_utf8
--- True when s is well-formed UTF-8 (no overlongs, surrogates or code points past U+10FFFF).
-- @function valid_utf8
-- @tparam string s
M.valid_utf8 = valid_utf8

-- A carried-through value: a scalar, short, printable, UTF-8. Returns nil | message.
local function check_extra(name, v)
  local t = type(v)
  if t == "number" then
    -- NaN, Infinity, 1e999 (as Python's json.dumps writes them) decode, but no output can encode them
    if v ~= v or v == math.huge or v == -math.huge then
      return ("column %s is not a finite number (NaN, Infinity or out of range)"):format(name)
    end
    return nil
  end
  if t == "boolean" then return nil end
  if t ~= "string" then return ("column %s must be a string, a number or a boolean"):format(name) end
  if #v > M.MAX_EXTRA then return ("column %s is longer than %d bytes"):format(name, M.MAX_EXTRA) end
  if not v:find("[^ -~]") then return nil end      -- (printable ASCII: the common case)
  if v:find("[%z\1-\31\127]") then return ("column %s contains control characters"):format(name) end
  if not valid_utf8(v) then return ("column %s is not valid UTF-8"):format(name) end
  return nil
end

-- Splits one CSV record (RFC 4180: quotes, doubled quotes). Returns fields |
-- nil, message. `more` reads the next physical line for a quoted line break.
local csv_split = core.csv_split
local function split_csv(line, more)
  local plain = csv_split(line)              -- the common case, no quoting at all: split in C
  if plain then return plain end
  local fields, i, n = {}, 1, #line
  while true do
    local c = line:sub(i, i)
    if c == '"' then
      local buf, j = {}, i + 1
      while true do
        local q = line:find('"', j, true)
        if not q then
          local nxt, merr = nil, nil
          if more then nxt, merr = more() end
          if not nxt then return nil, merr or "unterminated quoted field" end
          buf[#buf + 1] = line:sub(j) .. "\n"
          line, j, n = nxt, 1, #nxt
        elseif line:sub(q + 1, q + 1) == '"' then
          buf[#buf + 1] = line:sub(j, q)
          j = q + 2
        else
          buf[#buf + 1] = line:sub(j, q - 1)
          i = q + 1
          break
        end
      end
      fields[#fields + 1] = table.concat(buf)
      local d = line:sub(i, i)
      if d == "," then i = i + 1
      elseif d == "" then return fields
      else return nil, "unexpected text after a quoted field" end
    else
      local comma = line:find(",", i, true)
      local field = line:sub(i, (comma or n + 1) - 1)
      if field:find('"', 1, true) then return nil, "a quote inside an unquoted field" end
      fields[#fields + 1] = field
      if not comma then return fields end
      i = comma + 1
    end
  end
end
--- Splits one CSV record (RFC 4180: quotes, doubled quotes): fields | nil, message. `more()` returns the next
-- physical line, for a quoted line break.
-- @function split_csv
-- @tparam string line
-- @tparam[opt] function more
M.split_csv = split_csv

-- (the common case, nothing to trim, costs two byte reads: plans are large)
local function trim(s)
  local b, e = s:byte(1), s:byte(-1)
  if b == nil or (b > 32 and e > 32) then return s end
  return (s:gsub("^%s+", ""):gsub("%s+$", ""))
end

--- The name of a key that a JSON object text (one plan line, `n` distinct keys decoded from it) holds more
-- than once, or nil. Fast path: each key is a string followed by `:`, so when the line has no more `"` + `:`
-- pairs than decoded keys, no key can repeat; else every key is decoded (escapes too: `asset\u0049d` is
-- `assetId`) and compared.
function M.repeated_key(line, n)
  if core.json_key_count(line) <= n then return nil end
  local seen, i = {}, 1
  while true do
    local a = line:find('"', i, true)
    if not a then return nil end
    local j = a + 1
    while true do                          -- the closing quote: skip escaped characters
      local q = line:find('[\\"]', j)
      if not q then return nil end
      if line:byte(q) == 92 then j = q + 2 else j = q break end
    end
    if line:find("^%s*:", j + 1) then
      local key = json.decode(line:sub(a, j))
      if key ~= nil then
        if seen[key] then return key end
        seen[key] = true
      end
    end
    i = j + 1
  end
end

--- Copies a plan into a private temporary file (0600) and fingerprints it on the way: the check and the run
-- then read those bytes, whatever happens to the plan meanwhile. Returns {path, size, sha256, format} | nil, err.
-- sha256: SHA-256 chained over 64 KiB blocks (h = sha256(h .. block)), in hex; it names these exact bytes.
function M.snapshot(path, format)
  local st = core.stat(path)
  if st and st.type ~= "file" then
    return nil, ("cannot read the plan %s: it is a %s, not a regular file"):format(path, st.type)
  end
  local reader, err = M.open(path, format)         -- (format detection, and the error a user knows)
  if not reader then return nil, err end
  format = reader.format
  reader:close()
  local src = io.open(path, "rb")
  if not src then return nil, "cannot read the plan " .. path end
  local tmp = os.tmpname()
  local dst, derr = io.open(tmp, "wb")
  if not dst then src:close() os.remove(tmp) return nil, "cannot copy the plan: " .. tostring(derr) end
  local size, h = 0, ""
  while true do
    local block = src:read(65536)
    if not block then break end
    size = size + #block
    h = core.sha256_hex(h .. block)
    local ok, werr = dst:write(block)
    if not ok then src:close() dst:close() os.remove(tmp) return nil, "cannot copy the plan: " .. tostring(werr) end
  end
  src:close()
  local ok, cerr = dst:close()
  if not ok then os.remove(tmp) return nil, "cannot copy the plan: " .. tostring(cerr) end
  return { path = tmp, size = size, sha256 = h, format = format }
end

--- Opens a plan file. Returns a reader with :rows() (an iterator of row, err)
-- and :close(), or nil, message. format: "csv" | "jsonl" | nil (by extension or content).
-- What a file that is not a text plan starts with (spreadsheet exports and archives), and what to do instead.
local NOT_TEXT = {
  { "^\255\254", "UTF-16 text (a spreadsheet's \"Unicode text\" export): save it as \"CSV UTF-8\"" },
  { "^\254\255", "UTF-16 text (a spreadsheet's \"Unicode text\" export): save it as \"CSV UTF-8\"" },
  { "^\31\139", "gzip-compressed: decompress it first" },
  { "^PK\3\4", "a ZIP archive (an .xlsx workbook?): export the sheet as \"CSV UTF-8\"" },
  { "^%z", "binary, not text (it starts with a NUL byte)" },
}

--- Opens a plan: a reader (`rows`, `close`) | nil, message. `format` is "csv" or "jsonl"; without it, the
-- name decides (.jsonl, .ndjson, .json; .csv), else the first line (`{`: JSON Lines). A file that is not a
-- regular file, or is a spreadsheet export or an archive rather than text, is refused with what to do.
function M.open(path, format)
  local st = core.stat(path)
  if st and st.type ~= "file" then
    return nil, ("cannot read the plan %s: it is a %s, not a regular file"):format(path, st.type)
  end
  local f, err = io.open(path, "rb")
  if not f then return nil, "cannot read the plan: " .. tostring(err) end
  local head = f:read(4) or ""
  f:seek("set", 0)
  for _, nt in ipairs(NOT_TEXT) do
    if head:find(nt[1]) then f:close() return nil, ("the plan %s is %s"):format(path, nt[2]) end
  end
  if not format then
    if path:match("%.jsonl$") or path:match("%.ndjson$") or path:match("%.json$") then format = "jsonl"
    elseif path:match("%.csv$") then format = "csv"
    else
      local first = f:read("*l") or ""
      f:seek("set", 0)
      format = first:match("^%s*{") and "jsonl" or "csv"
    end
  end
  if format ~= "csv" and format ~= "jsonl" then f:close() return nil, "unknown plan format " .. tostring(format) end
  return setmetatable({ f = f, path = path, format = format }, { __index = M.Reader })
end

--- The methods of a plan reader (what `open` returns).
M.Reader = {}

--- Closes the plan file (a second close does nothing).
function M.Reader:close()
  if self.f then self.f:close() self.f = nil end
end

--- Iterates rows: each is {line = n, fields = {...}, extra = {name = value}} or
-- (nil, {line = n, message = ...}) for a malformed row.
function M.Reader:rows()
  local f, lineno, header = self.f, 0, nil
  local good_names, ngood = {}, 0    -- JSONL field names already checked (a few distinct ones, on every line)
  -- Lines split here, not by f:read("*l"): LuaJIT's line reader stops at a NUL byte and
  -- silently drops the rest of the line (a NUL must reach the row check, which names the field).
  -- Linear in the plan's size whatever its lines: the buffer never holds more than a line's cap plus a chunk,
  -- and a line over the cap is skipped chunk by chunk (reported, never buffered whole).
  local max_line = M.MAX_LINE
  local buf, pos, eof = "", 1, false
  local too_long = false      -- the last line returned was cut: over max_line
  local function rawline()
    too_long = false
    while true do
      local nl = buf:find("\n", pos, true)
      if nl then
        local l = nl - pos <= max_line and buf:sub(pos, nl - 1) or ""
        too_long = nl - pos > max_line
        pos = nl + 1
        return l
      end
      if #buf - pos + 1 > max_line then
        -- over the cap: drop the rest of this line as it streams in
        too_long = true
        while true do
          local chunk = f:read(65536)
          if not chunk then eof = true buf, pos = "", 1 return "" end
          local at = chunk:find("\n", 1, true)
          if at then buf, pos = chunk, at + 1 return "" end
        end
      end
      if eof then
        if pos > #buf then return nil end
        local l = buf:sub(pos)
        pos = #buf + 1
        return l
      end
      local chunk = f:read(65536)
      if chunk then buf, pos = buf:sub(pos) .. chunk, 1 else eof = true end
    end
  end
  local function nextline()
    local l = rawline()
    if l then
      lineno = lineno + 1
      if l:byte(-1) == 13 then l = l:sub(1, -2) end
    end
    return l
  end
  -- the next physical line of a quoted CSV field: the record as a whole stays under the cap
  local record_len = 0
  local function moreline()
    local l = nextline()
    if l == nil then return nil end
    record_len = record_len + #l + 1
    if too_long or record_len > max_line then return nil, "too long" end
    return l
  end
  return function()
    while true do
      local line = nextline()
      if not line then return nil end
      local start = lineno
      if too_long then
        -- (the header too: a header over the cap is fatal, nothing after it can be read as rows)
        return false, { line = start, fatal = self.format == "csv" and not header or nil,
          message = ("the line is longer than %d bytes"):format(max_line) }
      end
      if lineno == 1 then line = line:gsub("^\239\187\191", "") end      -- UTF-8 BOM
      local b1 = line:byte(1)                       -- (a byte for the common case, a match for the rest)
      local lead = b1 and b1 > 32 and b1 ~= 35 and "x" or line:match("^%s*(.?)")   -- "" blank, "#" comment
      if lead ~= "" and lead ~= "#" then
        if self.format == "jsonl" then
          local doc, jerr = json.decode(line)
          if type(doc) ~= "table" or doc[1] ~= nil then
            local what = jerr and excerpt(jerr, 80) or (type(doc) == "table" and "it is an array" or
              ((doc == nil or type(doc) == "userdata") and "it is null" or ("it is a " .. type(doc))))
            return false, { line = start, message = "not a JSON object: " .. what }
          end
          local fields, extra, n = {}, {}, 0
          for k, v in pairs(doc) do
            n = n + 1
            if KNOWN[k] then fields[k] = v
            else
              local bad = not good_names[k] and check_name(k) or check_extra(k, v)
              if not bad and ngood < 256 and not good_names[k] then good_names[k] = true ngood = ngood + 1 end
              if bad then return false, { line = start, message = bad } end
              -- (lua-cjson decodes 7 as 7.0 on Lua 5.4: carried as the integer the plan wrote)
              if tointeger and type(v) == "number" then v = tointeger(v) or v end
              extra[k] = v
            end
          end
          -- a repeated key ({"assetId":"A","assetId":"B"}): lua-cjson keeps one silently
          local dup = M.repeated_key(line, n)
          if dup then return false, { line = start, message = "field " .. excerpt(dup) .. " appears twice" } end
          return { line = start, fields = fields, extra = extra }
        end
        record_len = #line
        local cells, cerr = split_csv(line, moreline)
        if not cells then
          if cerr == "too long" then
            return false, { line = start, fatal = not header or nil,
              message = ("the record is longer than %d bytes"):format(max_line) }
          end
          return false, { line = start, message = "malformed CSV: " .. cerr }
        end
        if not header then
          header = {}
          for i, name in ipairs(cells) do header[i] = trim(name) end
          self.header = header
          -- what a spreadsheet export gets wrong, said in its own words before the name checks
          local raw = table.concat(cells, ",")
          if raw:find("\r", 1, true) then
            return false, { line = start, fatal = true, message = "header: the plan's lines end with a carriage " ..
              "return only (an old Mac export): save it as CSV with LF or CRLF line ends" }
          end
          if #cells == 1 and raw:find("\t", 1, true) then
            return false, { line = start, fatal = true, message = "header: the plan is tab-separated: save it " ..
              "as CSV (comma-separated)" }
          end
          local has = {}
          for i, name in ipairs(header) do
            local bad = check_name(name)
            if name == "" and i == #header and i > 1 then
              bad = "an empty column name at the end (a trailing comma in the header?)"
            end
            if not bad and has[name] then
              -- a spreadsheet export that repeats a column: the last one would silently win
              bad = "column " .. name .. " appears twice in the header"
            end
            if bad then return false, { line = start, fatal = true, message = "header: " .. bad } end
            has[name] = true
          end
          if not has.newDeviceKey or not (has.assetId or (has.productKey and has.deviceKey)) then
            return false, { line = start, fatal = true,
              message = "the header needs newDeviceKey and assetId or productKey,deviceKey (got: "
                .. excerpt(table.concat(header, ","), 200) .. ")" }
          end
        else
          if #cells ~= #header then
            return false, { line = start, message = ("has %d fields, the header has %d"):format(#cells, #header) }
          end
          local fields, extra = {}, {}
          for i, name in ipairs(header) do
            local v = trim(cells[i])
            if v ~= "" then
              if KNOWN[name] then fields[name] = v
              else
                local bad = check_extra(name, v)
                if bad then return false, { line = start, message = bad } end
                extra[name] = v
              end
            end
          end
          return { line = start, fields = fields, extra = extra, extra_order = header }
        end
      end
    end
  end
end

--- Where UTF-8 text holds a character that is invisible or turns the text's direction (U+00AD, U+200B-200F,
-- U+202A-202E, U+2060-2064, U+2066-2069, U+FEFF), or nil: an identifier with one looks like another, names no
-- device, and reorders a terminal line it is printed in (enos.target.invisible).
-- @function invisible
-- @tparam string v
M.invisible = target_mod.invisible

--- Validates one row's fields: returns target {assetId|productKey,deviceKey, newDeviceKey, orgId} | nil, message,
-- field (enos.target's rule, the one the client, the workflow and the CLI apply).
function M.check_row(fields)
  return target_mod.check(fields)
end

-- The key of the device productKey/deviceKey in an org (built without a target table: the check asks
-- it for every row's new key too).
local function device_key(org, product, key)
  return "d:" .. (org or "") .. ":" .. product .. ":" .. key
end

--- A stable key naming a row's target (for duplicates and the journal).
function M.target_key(t)
  if t.assetId then return "a:" .. (t.orgId or "") .. ":" .. t.assetId end
  return device_key(t.orgId, t.productKey, t.deviceKey)
end

--- Checks a whole plan (streamed). Returns {rows = n, errors = {{line, message}…}, error_count = n,
-- extra_columns = {…}, format = …} | nil, message.
-- Duplicates: the same target twice, the same newDeviceKey twice in one product (rows named by assetId: in
-- any product), and a newDeviceKey that is another row's current deviceKey (a chained rename).
-- Memory stays flat in the plan's size: the first pass keeps only 64-bit fingerprints of the keys (a C set,
-- about 16 MB a million rows); a fingerprint seen twice may be a collision, so when there are any, a second
-- pass re-reads the plan and keeps the exact keys of just those fingerprints, and only it reports duplicates.
function M.check(path, format, max_errors)
  max_errors = max_errors or 100
  local reader, err = M.open(path, format)
  if not reader then return nil, err end
  format = reader.format
  local out = { rows = 0, errors = {}, format = format }
  local errs, nerr = out.errors, 0
  local function add(list, line, message)
    if #list < max_errors then list[#list + 1] = { line = line, message = message } end
  end
  -- JSONL rows' extra fields become output columns too (first seen first; a row's own sorted), bounded
  local extra_seen, extra_order = {}, {}
  local tset, nset, maybe = core.keyset(), core.keyset(), core.keyset()
  local check_row, target_key, has_extra = M.check_row, M.target_key, format == "jsonl"
  for row, rerr in reader:rows() do
    if row == false then
      add(errs, rerr.line, rerr.message) nerr = nerr + 1
      if rerr.fatal then break end
    else
      out.rows = out.rows + 1
      if has_extra and next(row.extra) ~= nil then
        local names = {}
        for k in pairs(row.extra) do if not extra_seen[k] then names[#names + 1] = k end end
        table.sort(names)
        for _, k in ipairs(names) do
          if #extra_order >= M.MAX_EXTRA_COLUMNS then
            add(errs, row.line, ("more than %d distinct extra fields in the plan (%s)"):format(M.MAX_EXTRA_COLUMNS, excerpt(k)))
            nerr = nerr + 1
            break
          end
          extra_seen[k] = true
          extra_order[#extra_order + 1] = k
        end
      end
      local t, verr = check_row(row.fields)
      if not t then
        add(errs, row.line, verr) nerr = nerr + 1
      else
        local tk, nk, dk = target_key(t), t.newDeviceKey, t.deviceKey
        if tset:add(tk) then maybe:add(tk) end
        if nset:add(nk) then maybe:add("n:" .. nk) end
        if dk and nset:has(dk) then maybe:add("n:" .. dk) end
        if t.productKey then
          local nd = device_key(t.orgId, t.productKey, nk)
          if tset:has(nd) then maybe:add(nd) end
        end
      end
    end
  end
  reader:close()
  tset:free() nset:free()
  out.extra_columns = extra_order
  for _, name in ipairs(reader.header or {}) do
    if not KNOWN[name] then out.extra_columns[#out.extra_columns + 1] = name end
  end
  if maybe:count() > 0 then
    local dups, ndup = M._duplicates(path, format, maybe, max_errors)
    if ndup > 0 then
      nerr = nerr + ndup
      local merged, i, j = {}, 1, 1        -- both lists are in line order
      while #merged < max_errors and (errs[i] or dups[j]) do
        if dups[j] and (not errs[i] or dups[j].line < errs[i].line) then merged[#merged + 1] = dups[j] j = j + 1
        else merged[#merged + 1] = errs[i] i = i + 1 end
      end
      out.errors = merged
    end
  end
  maybe:free()
  if out.rows == 0 and nerr == 0 then add(out.errors, 0, "the plan has no rows") nerr = 1 end
  out.error_count = nerr
  return out
end

-- The check's second pass: the exact duplicate search, keeping only the keys whose fingerprint is in `maybe`
-- (a key outside it was seen once in the first pass, so no lookup of it can find an earlier row).
-- Returns the errors (line order, at most max_errors) and their count.
function M._duplicates(path, format, maybe, max_errors)
  local reader = assert(M.open(path, format))
  local targets, newkeys, anypk, errs, n = {}, {}, {}, {}, 0
  local function bucket(t, key)
    if t.productKey then return "n:" .. (t.orgId or "") .. ":" .. t.productKey .. ":" .. key end
    return "n:*:" .. key
  end
  local function add(line, message)
    n = n + 1
    if #errs < max_errors then errs[#errs + 1] = { line = line, message = message } end
  end
  for row, rerr in reader:rows() do
    local t = row and M.check_row(row.fields)
    if t then
      local line = row.line
      local tk = M.target_key(t)
      if targets[tk] then add(line, "the same device as line " .. targets[tk])
      elseif maybe:has(tk) then targets[tk] = line end
      -- new keys are unique per product: rows of two products may share one. A row named by assetId has a
      -- product only the platform knows, so its new key is compared with every row's.
      local nk = t.newDeviceKey
      local own = bucket(t, nk)
      local clash = newkeys[own] or (t.productKey and newkeys["n:*:" .. nk]) or (not t.productKey and anypk[nk])
      if clash then add(line, "newDeviceKey " .. nk .. " is also the new key of line " .. clash)
      elseif maybe:has("n:" .. nk) then
        newkeys[own] = line
        if t.productKey and not anypk[nk] then anypk[nk] = line end
      end
      local dk = t.deviceKey
      local chained = dk and (newkeys[bucket(t, dk)] or newkeys["n:*:" .. dk])
      if chained and chained ~= line then
        add(line, "deviceKey " .. dk .. " is the new key of line " .. chained
          .. " (chained renames are not supported in one batch)")
      end
      -- a new key that an earlier row's device has now (same product: keys are per product)
      local earlier = t.productKey and targets[device_key(t.orgId, t.productKey, nk)]
      if earlier and earlier ~= line then
        add(line, "newDeviceKey " .. nk .. " is the current key of line " .. earlier
          .. " (chained renames are not supported in one batch)")
      end
    elseif not row and rerr.fatal then break
    end
  end
  reader:close()
  return errs, n
end

return M
