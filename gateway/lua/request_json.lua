-- Requests whose body the transcoder parses: a POST/PUT with no body, or a body that is not strict
-- JSON, is a 400; every JSON body gets a trailing space, because the transcoder otherwise waits
-- forever after a bare top-level number. Not loaded for routes whose RPC takes the raw body (an
-- HttpBody field): the node checks those itself. Uses is_grpc and head_as_get from responses.lua.
-- A strict JSON (RFC 8259) checker: the transcoder's parser also takes single
-- quotes, bare keys and trailing commas. Returns the position after the value,
-- or nil and a reason.
local find, byte, sub = string.find, string.byte, string.sub
local MAX_DEPTH = 30  -- as MAX_DEPTH in server/entries.py
local value
local function ws(s, i) local _, e = find(s, "^[ \t\r\n]*", i) return e + 1 end
local function str(s, i)
  i = i + 1
  while true do
    local j = find(s, '["\\%z\1-\31]', i)
    if j == nil then return nil, "unterminated string" end
    local c = byte(s, j)
    if c == 34 then return j + 1 end
    if c ~= 92 then return nil, "control character in a string at byte " .. j end
    local n = byte(s, j + 1)
    if n == 117 then
      if not find(s, "^%x%x%x%x", j + 2) then return nil, "bad \\u escape at byte " .. j end
      i = j + 6
    elseif n and find('"\\/bfnrt', string.char(n), 1, true) then
      i = j + 2
    else
      return nil, "bad escape at byte " .. j
    end
  end
end
local function num(s, i)
  local _, e = find(s, "^-?%d+", i)
  if e == nil then return nil, "unexpected character at byte " .. i end
  local digits = sub(s, byte(s, i) == 45 and i + 1 or i, e)
  if #digits > 1 and byte(digits, 1) == 48 then return nil, "leading zero at byte " .. i end
  local _, f = find(s, "^%.%d+", e + 1)
  if f then e = f elseif byte(s, e + 1) == 46 then return nil, "bad number at byte " .. i end
  local _, x = find(s, "^[eE][+-]?%d+", e + 1)
  if x then e = x elseif find(s, "^[eE]", e + 1) then return nil, "bad number at byte " .. i end
  return e + 1
end
local function seq(s, i, depth, close, member)
  if depth > MAX_DEPTH then return nil, "nested deeper than " .. MAX_DEPTH end
  i = ws(s, i + 1)
  if byte(s, i) == close then return i + 1 end
  while true do
    local err
    if member then
      if byte(s, i) ~= 34 then return nil, "expected a string key at byte " .. i end
      i, err = str(s, i)
      if i == nil then return nil, err end
      i = ws(s, i)
      if byte(s, i) ~= 58 then return nil, "expected ':' at byte " .. i end
      i = ws(s, i + 1)
    end
    i, err = value(s, i, depth + 1)
    if i == nil then return nil, err end
    i = ws(s, i)
    local c = byte(s, i)
    if c == close then return i + 1 end
    if c ~= 44 then return nil, "expected ',' at byte " .. i end
    i = ws(s, i + 1)
  end
end
value = function(s, i, depth)
  local c = byte(s, i)
  if c == 123 then return seq(s, i, depth, 125, true) end
  if c == 91 then return seq(s, i, depth, 93, false) end
  if c == 34 then return str(s, i) end
  for _, word in ipairs({"true", "false", "null"}) do
    if sub(s, i, i + #word - 1) == word then return i + #word end
  end
  if c == nil then return nil, "unexpected end" end
  return num(s, i)
end
local function json_error(s)
  local i, err = value(s, ws(s, 1), 1)
  if i == nil then return err end
  if ws(s, i) <= #s then return "unexpected data after the value at byte " .. i end
  return nil
end
-- Whether the JSON value starting at byte i is of `kind` (see json_kind in server/rest_routes.py);
-- null is every field's default.
local KIND_BYTES = {
  string = '^["n]', boolean = "^[tfn]", number = "^[-%dn]", ["number or string"] = '^[-%d"n]',
  object = "^[{n]", array = "^[%[n]",
}
local function of_kind(s, i, kind)
  local pattern = KIND_BYTES[kind]
  return pattern == nil or find(s, pattern, i) ~= nil
end
local ESCAPED = {['"'] = '"', ["\\"] = "\\", ["/"] = "/", b = "\b", f = "\f", n = "\n", r = "\r", t = "\t"}
local function utf8_char(c)  -- LuaJIT has no utf8 library
  local floor, char = math.floor, string.char
  if c < 0x80 then return char(c) end
  if c < 0x800 then return char(0xC0 + floor(c / 64), 0x80 + c % 64) end
  if c < 0x10000 then return char(0xE0 + floor(c / 4096), 0x80 + floor(c / 64) % 64, 0x80 + c % 64) end
  return char(0xF0 + floor(c / 262144), 0x80 + floor(c / 4096) % 64, 0x80 + floor(c / 64) % 64, 0x80 + c % 64)
end
-- The text of a JSON string's inside (already checked to be valid), escapes decoded: `{"u\u0072l": …}`
-- names the member url, as the transcoder reads it.
local function unescape(s)
  if not find(s, "\\", 1, true) then return s end
  local out, i = {}, 1
  while true do
    local j = find(s, "\\", i, true)
    if j == nil then break end
    out[#out + 1] = sub(s, i, j - 1)
    local n = sub(s, j + 1, j + 1)
    i = j + 2
    if n == "u" then
      local c = tonumber(sub(s, i, i + 3), 16)
      i = i + 4
      if c >= 0xD800 and c < 0xDC00 and sub(s, i, i + 1) == "\\u" then  -- a surrogate pair
        local low = tonumber(sub(s, i + 2, i + 5), 16)
        if low >= 0xDC00 and low < 0xE000 then
          c = 0x10000 + (c - 0xD800) * 1024 + (low - 0xDC00)
          i = i + 6
        end
      end
      out[#out + 1] = utf8_char(c)
    else
      out[#out + 1] = ESCAPED[n]
    end
  end
  out[#out + 1] = sub(s, i)
  return table.concat(out)
end
-- What is wrong with the members of a JSON object (already checked to be valid JSON) for `kinds`
-- (member name -> kind): unknown members, or a member of another kind; nil if nothing, false if the
-- value is not an object.
local function members_wrong(s, kinds)
  local i = ws(s, 1)
  if byte(s, i) ~= 123 then return false end
  local unknown = {}
  i = ws(s, i + 1)
  while byte(s, i) == 34 do
    local j = str(s, i)
    local key = unescape(sub(s, i + 1, j - 2))
    i = ws(s, ws(s, j) + 1)  -- past the ':'
    local kind = kinds[key]
    if kind == nil then
      if #key > 64 then
        local n = 64  -- bytes: back off a character the cut would split (a UTF-8 continuation byte next)
        while n > 0 and byte(key, n + 1) >= 0x80 and byte(key, n + 1) < 0xC0 do n = n - 1 end
        key = sub(key, 1, n) .. "..."
      end
      unknown[#unknown + 1] = "'" .. key .. "'"
    elseif not of_kind(s, i, kind) then
      return key .. " must be a JSON " .. kind
    end
    i = ws(s, value(s, i, 2))
    if byte(s, i) == 44 then i = ws(s, i + 1) end
  end
  if #unknown > 0 then return "the request body has unknown members: " .. table.concat(unknown, ", ") end
  return nil
end
-- A body bound whole to a typed request (`body: "*"`): the transcoder would drop members the
-- message lacks unseen, and would answer a value of the wrong kind in protobuf's words. The
-- route's metadata gives the members and their kinds per method (server/rest_routes.py).
local function members_error(handle, method, text)
  local members = handle:metadata():get("members")
  if members == nil or members[method] == nil then return nil end
  local wrong = members_wrong(text, members[method])
  if wrong == false then
    local names = {}
    for name in pairs(members[method]) do names[#names + 1] = name end
    table.sort(names)
    return "the request body must be a JSON object with " .. table.concat(names, ", ")
  end
  return wrong
end
heads = true  -- see head_as_get in responses.lua
function envoy_on_request(handle)
  local headers = handle:headers()
  if is_grpc(headers) then return end
  head_as_get(handle, headers)
  local method = headers:get(":method")
  if method ~= "POST" and method ~= "PUT" and method ~= "DELETE" and method ~= "PATCH" then
    return
  end
  local body = handle:body(true)
  local size = 0
  if body ~= nil then size = body:length() end
  if size == 0 then
    if method == "POST" or method == "PUT" then
      handle:respond({[":status"] = "400"},
        "the request body must be JSON")
    end
    return
  end
  local text = body:getBytes(0, size)
  local err = json_error(text)
  if err ~= nil then
    handle:respond({[":status"] = "400"}, "the request body is not valid JSON: " .. err)
    return
  end
  err = members_error(handle, method, text)
  if err ~= nil then
    handle:respond({[":status"] = "400"}, err)
    return
  end
  body:setBytes(text .. " ")
end
