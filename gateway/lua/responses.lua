-- The REST side of every response: the servicers' `x-http-code` / `location` trailing metadata
-- become the HTTP status (201, 204, ...) and header, 204s lose their body, gRPC headers are dropped.
-- A call that failed ends with its headers alone, so its metadata is found there instead.
-- Also lets HEAD through wherever GET goes (head_as_get, with request_json.lua).
-- Loaded on every route, before request_json.lua where that is loaded too.
-- As Envoy tells gRPC: application/grpc, alone or followed by + or ; (application/grpc-web is not).
local function is_grpc(headers)
  local ctype = headers:get("content-type") or ""
  if string.find(ctype, "application/grpc", 1, true) ~= 1 then return false end
  local after = string.sub(ctype, 17, 17)
  return after == "" or after == "+" or after == ";"
end
local function strip_grpc(map)
  map:remove("grpc-status")
  map:remove("grpc-message")
  map:remove("grpc-accept-encoding")
end
-- HEAD: wherever GET goes, HEAD goes on to the transcoder as a GET, marked in the stream's
-- metadata, and its answer loses its body but keeps the GET's content-length. (Envoy itself leaves
-- the body out only of answers to what reaches its router as HEAD.) Only routes that load
-- request_json.lua take GET: its envoy_on_request calls head_as_get and sets `heads`, so the
-- raw-body routes (POST /log among them) run no Lua on requests and no HEAD check on answers.
local heads = false
local HEAD_KEY = "head"
local function head_as_get(handle, headers)
  if headers:get(":method") == "HEAD" then
    headers:replace(":method", "GET")
    handle:streamInfo():dynamicMetadata():set("potboiler", HEAD_KEY, "1")
  end
end
local function asked_head(handle)
  local meta = handle:streamInfo():dynamicMetadata():get("potboiler")
  return meta ~= nil and meta[HEAD_KEY] == "1"
end
-- The status and Location a servicer asked for; the body, if it had to be read.
local function status_and_location(handle, headers)
  strip_grpc(headers)
  local meta, body = headers, nil
  if headers:get("x-http-code") == nil then
    -- Trailers come after the body: wait for both (the transcoder buffers a unary answer anyway),
    -- holding the headers back so they can still change. body() yields: fetch headers again.
    body = handle:body(true)
    meta = handle:trailers()
    if meta == nil then return body end
    headers = handle:headers()
  end
  local code, location = meta:get("x-http-code"), meta:get("location")
  if meta ~= headers then
    meta:remove("x-http-code")
    meta:remove("location")
    strip_grpc(meta)
  else
    headers:remove("x-http-code")
  end
  if location ~= nil then headers:replace("location", location) end
  if code == nil then return body end
  headers:replace(":status", code)
  if code == "204" then
    headers:remove("content-type")
    if body ~= nil then body:setBytes("") end  -- sets content-length: remove it after
    headers:remove("content-length")
  end
  return body
end
-- A 400 of the transcoder's for a query parameter that no field takes names the request's
-- protobuf type: say it in the API's words.
local function plain_words(handle, body)
  if handle:headers():get(":status") ~= "400" then return body end
  body = body or handle:body(true)
  if body == nil then return nil end
  local text = body:getBytes(0, body:length())
  local fixed, n = string.gsub(text, 'Could not find field \\"(.-)\\" in the type \\"[%w%._]+\\"%.',
    "unknown query parameter '%1'")
  if n > 0 then body:setBytes(fixed) end
  return body
end
function envoy_on_response(handle)
  local headers = handle:headers()
  if is_grpc(headers) then return end
  local body = plain_words(handle, status_and_location(handle, headers))
  if heads and asked_head(handle) then
    body = body or handle:body(true)
    headers = handle:headers()
    if body ~= nil then
      local length = body:length()
      body:setBytes("")
      headers:replace("content-length", tostring(length))
    end
  end
end
