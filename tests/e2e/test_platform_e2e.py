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
