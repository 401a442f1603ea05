-- Argo CD health check for kubetune.dev/MergeJob (resource.customizations.health.kubetune.dev_MergeJob).
-- Healthy once the merged model is published, Degraded when the merge failed (or its FineTuneJob did),
-- Progressing while it waits for the FineTuneJob or runs.
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
  hs.message = "Succeeded: merged model at " .. (st.mergedUri or "?")
elseif st.phase == "Failed" or stalled ~= nil then
  hs.status = "Degraded"
  hs.message = ((stalled and stalled.reason) or "Failed") .. ": " .. message
elseif st.phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = message
else
  hs.status = "Progressing"
  hs.message = (st.phase or "Pending") .. ": " .. message
end
return hs
