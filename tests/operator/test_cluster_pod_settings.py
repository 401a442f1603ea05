"""spec.pod against the real control plane with the chart's RBAC (issue #15, part 1): a job that
names its own ServiceAccount (workload identity) and no storage.secretRef waits, named, until the
ServiceAccount exists; then its pod runs as it, with the job's labels, annotations, pull secrets
and env, and that ServiceAccount's token may patch the job's status (the progress channel) and
nothing else of kubetune's."""

from __future__ import annotations

from typing import Any

import pytest
from clusterkit import GROUP, create, ftj_spec, job, phase_is, ready, wait_for, wait_pod, wait_status

pytestmark = pytest.mark.integration


def test_own_service_account_without_storage_secret(cluster: Any, ns: str, operator_proc: Any) -> None:
    pod = {"serviceAccountName": "trainer-identity", "imagePullSecrets": ["registry-creds"],
           "labels": {"cost-center": "ml"}, "annotations": {"sidecar.istio.io/inject": "false"},
           "env": [{"name": "AWS_ROLE_ARN", "value": "arn:aws:iam::000000000000:role/trainer"}]}
    create(cluster, ns, "FineTuneJob", "wi", ftj_spec(storage={"endpoint": "http://minio.storage:9000"}, pod=pod))
    st = wait_status(cluster, ns, "FineTuneJob", "wi", phase_is("Pending", "ServiceAccountNotFound"), 30)
    assert "trainer-identity" in st["message"] and job(cluster, ns, "wi-train") is None

    cluster.request("POST", f"/api/v1/namespaces/{ns}/serviceaccounts", {"metadata": {"name": "trainer-identity"}})
    j = wait_for(lambda: job(cluster, ns, "wi-train"), 90, "the Job once the ServiceAccount exists")
    spec = j["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "trainer-identity"
    assert spec["imagePullSecrets"] == [{"name": "registry-creds"}]
    (container,) = spec["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["AWS_ROLE_ARN"]["value"].endswith("role/trainer")
    assert "AWS_ACCESS_KEY_ID" not in env  # no storage.secretRef: credentials come from the identity
    created = wait_pod(cluster, ns, "wi-train")
    assert created["metadata"]["labels"]["cost-center"] == "ml"
    assert created["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    assert created["spec"]["serviceAccountName"] == "trainer-identity"
    assert ready(wait_status(cluster, ns, "FineTuneJob", "wi", phase_is("Pending"), 30)).get("reason") != \
        "ServiceAccountNotFound"

    # the progress channel works with that ServiceAccount's token, and grants nothing more
    token = cluster.create_token(ns, "trainer-identity")
    status_path = f"{GROUP}/namespaces/{ns}/finetunejobs/wi/status"
    cluster.request("PATCH", status_path, {"status": {"stage": "loading dataset"}}, token=token,
                    content_type="application/merge-patch+json")
    assert wait_for(lambda: (cluster.request("GET", f"{GROUP}/namespaces/{ns}/finetunejobs/wi")
                             .get("status") or {}).get("stage") == "loading dataset", 10, "the stage")
    with pytest.raises(Exception, match="403"):
        cluster.request("GET", f"{GROUP}/namespaces/{ns}/finetunejobs", token=token)
