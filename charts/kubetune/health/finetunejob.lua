-- Argo CD health check for kubetune.dev/FineTuneJob (resource.customizations.health.kubetune.dev_FineTuneJob).
-- Healthy once training succeeded, Degraded when it failed or is stalled (bad image, missing Secret),
-- Suspended while spec.suspend holds, Progressing otherwise (with the trainer's progress).
local hs = {status = "Progressing", message = "Waiting for the kubetune operator"}
if obj.status == nil then
  return hs
end
local st = obj.status
local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and st.observedGeneration ~= nil and st.observedGeneration < generation then
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end
local stalled = nil
if st.conditions ~= nil then
  for _, c in ipairs(st.conditions) do
    if c.type == "Stalled" and c.status == "True" then
      stalled = c
    end
  end
end
local message = st.message or ""
if st.phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = "Succeeded: adapter at " .. (st.adapterUri or "?")
elseif st.phase == "Failed" or stalled ~= nil then
  hs.status = "Degraded"
  local reason = (stalled and stalled.reason) or "Failed"
  hs.message = reason .. ": " .. message
elseif st.phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = message
else
  hs.status = "Progressing"
  hs.message = (st.phase or "Pending") .. ": " .. message
  if st.progress ~= nil and st.progress.percent ~= nil then
    hs.message = hs.message .. " (" .. tostring(st.progress.percent) .. "%"
    if st.progress.eta ~= nil then
      hs.message = hs.message .. ", ETA " .. st.progress.eta
    end
    hs.message = hs.message .. ")"
  end
end
return hs
