"""Fitting the platform, on the real node (issue #15): a FineTuneJob that runs as its own
ServiceAccount with workload identity trains with no storage Secret at all.

The identity is IRSA's, built the way the EKS pod-identity webhook builds it, with spec.pod alone:
a projected ServiceAccount token (audience sts.amazonaws.com), AWS_ROLE_ARN and
AWS_WEB_IDENTITY_TOKEN_FILE. boto3 exchanges the token at STS (moto's, AWS_ENDPOINT_URL_STS) for
temporary credentials; the pod has no other credentials (no AWS_ACCESS_KEY_ID, no instance
metadata), so every object it stored proves the exchange. The progress in the status proves the
job's progress-channel Role is bound to that ServiceAccount."""

from __future__ import annotations

from typing import Any

import pytest
from e2e_support import System
from test_e2e import FTJ, finetune, wait_phase

pytestmark = [pytest.mark.e2e, pytest.mark.realnode]

TOKEN_DIR = "/var/run/secrets/eks.amazonaws.com/serviceaccount"


def test_workload_identity_without_a_storage_secret(real_system: System) -> None:
    system, name = real_system, "identity"
    system.cluster.kube.request("POST", f"/api/v1/namespaces/{system.namespace}/serviceaccounts",
                                body={"metadata": {"name": "trainer-identity"}})
    manifest = finetune(system, name, max_steps=2, save_steps=2)
    spec: dict[str, Any] = manifest["spec"]
    spec["storage"] = {"endpoint": system.pod_endpoint}  # no secretRef
    spec["pod"] = {
        "serviceAccountName": "trainer-identity",
        "volumes": [{"name": "aws-iam-token", "projected": {"sources": [{"serviceAccountToken": {
            "audience": "sts.amazonaws.com", "expirationSeconds": 86400, "path": "token"}}]}}],
        "volumeMounts": [{"name": "aws-iam-token", "mountPath": TOKEN_DIR, "readOnly": True}],
        "env": [{"name": "AWS_ROLE_ARN", "value": "arn:aws:iam::123456789012:role/kubetune-trainer"},
                {"name": "AWS_WEB_IDENTITY_TOKEN_FILE", "value": f"{TOKEN_DIR}/token"},
                {"name": "AWS_ENDPOINT_URL_STS", "value": system.pod_endpoint},
                {"name": "AWS_DEFAULT_REGION", "value": "us-east-1"}],
    }
    system.cluster.apply(manifest, namespace=system.namespace)
    done = wait_phase(system, FTJ, name, "Succeeded", "Failed")
    st = done["status"]
    assert st["phase"] == "Succeeded", f"{st}\n{system.diagnostics()}"
    assert st["progress"]["step"] == 2  # reported by the pod, as trainer-identity
    assert "adapter_config.json" in system.s3_keys(st["adapterUri"])
    job = system.cluster.get(f"/apis/batch/v1/namespaces/{system.namespace}/jobs/{st['jobName']}")
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "trainer-identity"
    names = {e["name"] for e in pod["containers"][0]["env"]}
    assert not names & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}, names


def test_a_retried_pod_reads_the_model_from_the_cache(real_system: System, tmp_path_factory: Any) -> None:
    """spec.modelCache on the real node: a PersistentVolumeClaim (bound to a hostPath volume of the
    node). The CPU prepare pod downloads the model into it (issue #18: the model moves once, before
    any GPU waits) and the GPU pod reads it from there; the GPU pod is deleted mid-run and the retry
    reads the model from the cache too (issue #15, part 2)."""
    import os
    import re

    from e2e_support import wait_for
    from test_real_node import pod_of

    system, name = real_system, "cached"
    ns = system.namespace
    folder = tmp_path_factory.mktemp("model-cache")
    os.chmod(folder, 0o777)  # the pod runs as UID 1000; a hostPath volume is not chowned to its fsGroup
    system.cluster.kube.request("POST", "/api/v1/persistentvolumes", body={
        "metadata": {"name": f"model-cache-{ns}"},
        "spec": {"capacity": {"storage": "5Gi"}, "accessModes": ["ReadWriteMany"], "storageClassName": "",
                 "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": str(folder), "type": "Directory"},
                 "claimRef": {"namespace": ns, "name": "hf-models"}}})
    system.cluster.kube.request("POST", f"/api/v1/namespaces/{ns}/persistentvolumeclaims", body={
        "metadata": {"name": "hf-models"},
        "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": f"model-cache-{ns}",
                 "resources": {"requests": {"storage": "5Gi"}}}})
    manifest = finetune(system, name, max_steps=40, save_steps=2)
    manifest["spec"]["modelCache"] = {"claimName": "hf-models"}
    system.cluster.apply(manifest, namespace=ns)

    def checkpointed() -> dict[str, Any] | None:
        st = (system.resource(FTJ, name) or {}).get("status") or {}
        if st.get("phase") in ("Succeeded", "Failed"):
            raise AssertionError(f"the run ended before its pod could be deleted: {st}")
        return st if st.get("checkpointUri") else None

    try:
        wait_for(checkpointed, 420, "a first checkpoint", interval=0.5)
    except AssertionError as err:
        pvc = system.cluster.get(f"/api/v1/namespaces/{ns}/persistentvolumeclaims/hf-models")
        raise AssertionError(f"{err}\nPVC: {(pvc or {}).get('status')}\nstatus: "
                             f"{(system.resource(FTJ, name) or {}).get('status')}\n{system.diagnostics()}") from None
    bound = system.cluster.get(f"/api/v1/namespaces/{ns}/persistentvolumeclaims/hf-models")
    assert bound["status"]["phase"] == "Bound", bound["status"]
    # the model moved once, on CPU: the prepare pod stored it, the first GPU pod read it from the volume
    prepare_log = system.cluster.kubectl("logs", "-n", ns, pod_of(system, name, "prepare")["metadata"]["name"]).stdout
    assert "stored in the model cache" in prepare_log, prepare_log[-3000:]
    first = pod_of(system, name)["metadata"]["name"]
    first_log = system.cluster.kubectl("logs", "-n", ns, first).stdout
    assert "from the model cache" in first_log and "stored in the model cache" not in first_log, first_log[-3000:]
    system.cluster.kubectl("delete", "pod", first, "-n", ns, "--wait=true", timeout=180)
    done = wait_phase(system, FTJ, name, "Succeeded", "Failed")
    assert done["status"]["phase"] == "Succeeded", f"{done['status']}\n{system.diagnostics()}"
    retry = pod_of(system, name)
    assert retry["metadata"]["name"] != first
    log = system.cluster.kubectl("logs", "-n", ns, retry["metadata"]["name"]).stdout
    assert "from the model cache" in log and "stored in the model cache" not in log, log[-3000:]
    assert re.search(r"resuming from step \d+", log)
    assert len(list((folder / "models").iterdir())) == 1  # one entry, whole (no partial copy left)
