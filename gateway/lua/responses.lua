-- The REST side of every response: the servicers' `x-http-code` / `location` initial metadata
-- become the HTTP status (201, 204) and header, 204s lose their body, gRPC headers are dropped.
-- Loaded on every route, before request_json.lua where that is loaded too.
local function is_grpc(headers)
  local ctype = headers:get("content-type") or ""
  return string.find(ctype, "application/grpc", 1, true) == 1
end
function envoy_on_response(handle)
  local headers = handle:headers()
  if is_grpc(headers) then return end
  headers:remove("grpc-status")
  headers:remove("grpc-message")
  headers:remove("grpc-accept-encoding")
  local code = headers:get("x-http-code")
  if code == nil then return end
  headers:remove("x-http-code")
  headers:replace(":status", code)
  if code == "204" then
    headers:remove("content-type")
    -- body() yields: headers must be fetched again afterwards.
    handle:body(true):setBytes("")
    handle:headers():remove("content-length")
  end
end
