-- The REST side of every response: the servicers' `x-http-code` / `location` trailing metadata
-- become the HTTP status (201, 204, ...) and header, 204s lose their body, gRPC headers are dropped.
-- A call that failed ends with its headers alone, so its metadata is found there instead.
-- Loaded on every route, before request_json.lua where that is loaded too.
local function is_grpc(headers)
  local ctype = headers:get("content-type") or ""
  return string.find(ctype, "application/grpc", 1, true) == 1
end
local function strip_grpc(map)
  map:remove("grpc-status")
  map:remove("grpc-message")
  map:remove("grpc-accept-encoding")
end
function envoy_on_response(handle)
  local headers = handle:headers()
  if is_grpc(headers) then return end
  strip_grpc(headers)
  local meta, body = headers, nil
  if headers:get("x-http-code") == nil then
    -- Trailers come after the body: wait for both (the transcoder buffers a unary answer anyway),
    -- holding the headers back so they can still change. body() yields: fetch headers again.
    body = handle:body(true)
    meta = handle:trailers()
    if meta == nil then return end
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
  if code == nil then return end
  headers:replace(":status", code)
  if code == "204" then
    headers:remove("content-type")
    if body ~= nil then body:setBytes("") end  -- sets content-length: remove it after
    headers:remove("content-length")
  end
end
