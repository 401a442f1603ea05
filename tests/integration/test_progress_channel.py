"""The progress channel is least-privilege: a job's pod token, bound by the operator's own Role
builder, may patch its own resource's status and nothing else; the pod's fields (progress, stage)
fit the CRD's schema; and the channel never breaks training."""

from __future__ import annotations

import copy
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubetune_operator import builders
from kubetune_trainer.runtime import StatusReporter
from manifests import minimal_ftj

from kubetune.api import STAGE_MAX_LENGTH

pytestmark = pytest.mark.integration
BASE = "/apis/kubetune.dev/v1alpha1/namespaces/{ns}/finetunejobs"


def create_ftj(cluster: Any, ns: str, name: str) -> dict[str, Any]:
    doc = copy.deepcopy(minimal_ftj())
    doc["metadata"] = {"name": name, "namespace": ns}
    return cluster.request("POST", BASE.format(ns=ns), doc)


def reporter(cluster: Any, token_dir: Path, ns: str, name: str) -> StatusReporter:
    return StatusReporter(server=cluster.server, token_file=token_dir / "token", ca_file=Path(cluster.ca_file),
                          kind="FineTuneJob", name=name, namespace=ns)


def test_pod_token_patches_only_its_own_status(crds_installed: Any, tmp_path: Path) -> None:
    cluster = crds_installed
    ns = f"chan-{uuid.uuid4().hex[:6]}"
    cluster.request("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    mine, other = create_ftj(cluster, ns, "mine"), create_ftj(cluster, ns, "other")
    for doc in (builders.service_account(mine), builders.role(mine), builders.role_binding(mine)):
        group = "/api/v1" if doc["apiVersion"] == "v1" else f"/apis/{doc['apiVersion']}"
        plural = {"ServiceAccount": "serviceaccounts", "Role": "roles", "RoleBinding": "rolebindings"}[doc["kind"]]
        cluster.request("POST", f"{group}/namespaces/{ns}/{plural}", doc)
    sa = builders.service_account(mine)["metadata"]["name"]
    (tmp_path / "token").write_text(cluster.create_token(ns, sa))

    ok = reporter(cluster, tmp_path, ns, "mine")
    assert ok.enabled
    assert ok.patch({"progress": {"step": 3, "totalSteps": 10, "percent": 30, "loss": 2.5}})
    status = cluster.request("GET", f"{BASE.format(ns=ns)}/mine")["status"]
    assert status["progress"] == {"step": 3, "totalSteps": 10, "percent": 30, "loss": 2.5}

    # The pod's stage: cut by the reporter to the CRD's maxLength, which the API server enforces.
    long_stage = f"loading dataset s3://data/{'x' * 400}.jsonl"
    assert ok.patch({"stage": long_stage})
    status = cluster.request("GET", f"{BASE.format(ns=ns)}/mine")["status"]
    assert status["stage"] == long_stage[:STAGE_MAX_LENGTH - 3] + "..." and "message" not in status
    assert status["progress"]["step"] == 3  # a merge patch: the progress stays
    with pytest.raises(Exception, match="422"):
        cluster.request("PATCH", f"{BASE.format(ns=ns)}/mine/status", {"status": {"stage": long_stage}},
                        content_type="application/merge-patch+json")

    denied = reporter(cluster, tmp_path, ns, "other")  # the same token on another job
    assert denied.patch({"progress": {"step": 99}}) is False and denied.failures == 1
    assert "status" not in cluster.request("GET", f"{BASE.format(ns=ns)}/other")

    # The token cannot read the spec, list jobs, or read Secrets either.
    token = (tmp_path / "token").read_text()
    for path in (f"{BASE.format(ns=ns)}/mine", BASE.format(ns=ns), f"/api/v1/namespaces/{ns}/secrets"):
        with pytest.raises(Exception, match="403"):
            cluster.request("GET", path, token=token)
    assert other["metadata"]["name"] == "other"


def test_a_dead_channel_never_raises(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("x")
    dead = StatusReporter(server="https://127.0.0.1:9", token_file=tmp_path / "token", ca_file=None,
                          kind="FineTuneJob", name="a", namespace="b", timeout=2)
    assert dead.patch({"progress": {"step": 1}}) is False
    assert dead.patch({"progress": {"step": 2}}) is False and dead.failures == 2
