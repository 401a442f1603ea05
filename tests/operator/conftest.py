"""Fixtures for the operator tests.

Unit tests use :func:`ftj_body` / :func:`mj_body` (resources as the API server returns them) and
the Job/pod factories in ``kobjects.py``. Integration tests (``test_cluster_*.py``) use the real local control
plane from ``hack/cluster.py`` and run ``kubetune operator`` in a subprocess with a ServiceAccount
token bound to the chart's ClusterRole (not admin).
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from clusterkit import OperatorProcess, chart_rules, lease_rules, nodes_rules, wait_for
from kobjects import FTJ_SPEC, make_body

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubetune"

@pytest.fixture
def ftj_body() -> Callable[..., dict[str, Any]]:
    def make(name: str = "demo", **spec_overrides: Any) -> dict[str, Any]:
        return make_body("FineTuneJob", {**FTJ_SPEC, **spec_overrides}, name=name)

    return make


@pytest.fixture
def mj_body() -> Callable[..., dict[str, Any]]:
    def make(name: str = "demo-merged", **spec_overrides: Any) -> dict[str, Any]:
        spec = {"source": {"fineTuneJobRef": {"name": "demo"}}, "output": {"uri": "s3://out/merged"},
                **spec_overrides}
        return make_body("MergeJob", spec, name=name)

    return make


# ------------------------------------------------------------------------------ cluster fixtures
@pytest.fixture(scope="session")
def cluster() -> Iterator[Any]:
    """A real control plane (etcd, apiserver, controller-manager, scheduler, kwok) with the CRDs."""
    sys.path.insert(0, str(REPO / "hack"))
    import cluster as cluster_mod

    c = cluster_mod.LocalCluster.start()
    try:
        c.install_crds(REPO / "crds")
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def operator_identity(cluster: Any) -> dict[str, Any]:
    """The operator's ServiceAccount bound to the chart's ClusterRole (cluster-wide binding, as the
    chart does with watchNamespaces empty) and its leader-election Role; returns the kubeconfig."""
    ns = "kubetune-system"
    cluster.request("POST", "/api/v1/namespaces", {"metadata": {"name": ns}})
    cluster.request("POST", f"/api/v1/namespaces/{ns}/serviceaccounts", {"metadata": {"name": "kubetune-operator"}})
    rbac = "/apis/rbac.authorization.k8s.io/v1"
    cluster.request("POST", f"{rbac}/clusterroles", {"metadata": {"name": "kubetune-operator"},
                                                      "rules": chart_rules()})
    cluster.request("POST", f"{rbac}/clusterrolebindings", {
        "metadata": {"name": "kubetune-operator"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kubetune-operator"},
        "subjects": [{"kind": "ServiceAccount", "name": "kubetune-operator", "namespace": ns}]})
    cluster.request("POST", f"{rbac}/clusterroles", {"metadata": {"name": "kubetune-operator-nodes"},
                                                      "rules": nodes_rules()})  # readNodes (the default)
    cluster.request("POST", f"{rbac}/clusterrolebindings", {
        "metadata": {"name": "kubetune-operator-nodes"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kubetune-operator-nodes"},
        "subjects": [{"kind": "ServiceAccount", "name": "kubetune-operator", "namespace": ns}]})
    cluster.request("POST", f"{rbac}/namespaces/{ns}/roles", {"metadata": {"name": "kubetune-operator-leader"},
                                                             "rules": lease_rules()})
    cluster.request("POST", f"{rbac}/namespaces/{ns}/rolebindings", {
        "metadata": {"name": "kubetune-operator-leader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "kubetune-operator-leader"},
        "subjects": [{"kind": "ServiceAccount", "name": "kubetune-operator", "namespace": ns}]})
    token = cluster.create_token(ns, "kubetune-operator", expiration_seconds=86400)
    return {"namespace": ns, "kubeconfig": str(cluster.kubeconfig_for_token(token)), "token": token}


@pytest.fixture
def ns(cluster: Any) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.request("POST", "/api/v1/namespaces", {"metadata": {"name": name}})
    wait_for(lambda: cluster.request("GET", f"/api/v1/namespaces/{name}/serviceaccounts/default", ok404=True),
             30, "default ServiceAccount")
    yield name
    # Play the kubelet one last time: end the pods still on runner-node (no kubelet there), or they
    # would hold its GPUs for the rest of the session while their namespace never finishes deleting.
    for pod in cluster.request("GET", f"/api/v1/namespaces/{name}/pods")["items"]:
        if (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
            cluster.request("PATCH", f"/api/v1/namespaces/{name}/pods/{pod['metadata']['name']}/status",
                            {"status": {"phase": "Failed", "reason": "TestTeardown"}},
                            content_type="application/merge-patch+json", ok404=True)
    cluster.request("DELETE", f"/api/v1/namespaces/{name}", ok404=True)


@pytest.fixture
def operator_proc(operator_identity: dict[str, Any], ns: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    op = OperatorProcess(operator_identity["kubeconfig"], [ns], tmp_path / "operator.log").start()
    try:
        yield op
    finally:
        op.stop()
        if op.proc and op.proc.returncode not in (0, -15, None):
            print(op.logs()[-5000:])
