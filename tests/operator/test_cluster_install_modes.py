"""The chart's install modes against the real control plane, each with its exact RBAC (issue #15,
part 3; docs/operator.md, "RBAC"):

* scoped (the default): the ClusterRole bound by a RoleBinding in the watched namespace only, with
  checkSecrets. The operator runs its jobs there (a missing Secret is named before any pod) and
  can read nothing of another namespace;
* cluster-wide (clusterWide: true, opt-in): a ClusterRoleBinding, and checkSecrets off by default,
  so no Secret is readable anywhere: the operator makes the Job without reading the Secret (the
  API server's audit log shows no request for it), and a missing Secret shows on the pod.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from clusterkit import (
    GROUP,
    OperatorProcess,
    chart_rules,
    create,
    create_s3_secret,
    ftj_spec,
    job,
    phase_is,
    wait_for,
    wait_status,
)

pytestmark = pytest.mark.integration
RBAC = "/apis/rbac.authorization.k8s.io/v1"
SYSTEM = "kubetune-system"


def identity(cluster: Any, name: str, rules: list[dict[str, Any]], bind_in: str | None) -> tuple[str, str]:
    """A ServiceAccount for the operator with a ClusterRole of ``rules``, bound in ``bind_in`` only
    (a RoleBinding) or cluster-wide (None). -> (kubeconfig, username)."""
    if cluster.request("GET", f"/api/v1/namespaces/{SYSTEM}", ok404=True) is None:
        cluster.request("POST", "/api/v1/namespaces", {"metadata": {"name": SYSTEM}})
    cluster.request("POST", f"/api/v1/namespaces/{SYSTEM}/serviceaccounts", {"metadata": {"name": name}})
    cluster.request("POST", f"{RBAC}/clusterroles", {"metadata": {"name": name}, "rules": rules})
    binding = {"metadata": {"name": name},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
               "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": SYSTEM}]}
    path = f"{RBAC}/namespaces/{bind_in}/rolebindings" if bind_in else f"{RBAC}/clusterrolebindings"
    cluster.request("POST", path, binding)
    token = cluster.create_token(SYSTEM, name, expiration_seconds=3600)
    return str(cluster.kubeconfig_for_token(token)), f"system:serviceaccount:{SYSTEM}:{name}"


def test_scoped_install_runs_its_namespace_and_reads_no_other(cluster: Any, ns: str, tmp_path: Path) -> None:
    name = f"kt-scoped-{uuid.uuid4().hex[:6]}"
    kubeconfig, user = identity(cluster, name, chart_rules(check_secrets=True), bind_in=ns)
    op = OperatorProcess(kubeconfig, [ns], tmp_path / "operator.log").start()
    try:
        create(cluster, ns, "FineTuneJob", "scoped", ftj_spec())
        st = wait_status(cluster, ns, "FineTuneJob", "scoped", phase_is("Pending", "SecretNotFound"), 60)
        assert "s3-creds" in st["message"]  # checkSecrets: named before any pod
        create_s3_secret(cluster, ns)
        wait_for(lambda: job(cluster, ns, "scoped-train"), 90, "the Job once the Secret exists")
        assert "Forbidden" not in op.logs(), op.logs()[-3000:]
    finally:
        op.stop()
    token = cluster.create_token(SYSTEM, name)
    for elsewhere in (f"{GROUP}/namespaces/default/finetunejobs", "/api/v1/namespaces/default/secrets/anything",
                      f"{GROUP}/finetunejobs"):
        with pytest.raises(Exception, match="403"):
            cluster.request("GET", elsewhere, token=token)


def test_cluster_wide_install_never_reads_a_secret(cluster: Any, ns: str, tmp_path: Path) -> None:
    name = f"kt-wide-{uuid.uuid4().hex[:6]}"
    kubeconfig, user = identity(cluster, name, chart_rules(check_secrets=False), bind_in=None)
    op = OperatorProcess(kubeconfig, [ns], tmp_path / "operator.log", extra=["--no-check-secrets"]).start()
    try:
        create(cluster, ns, "FineTuneJob", "wide", ftj_spec())  # its Secret s3-creds does not exist
        j = wait_for(lambda: job(cluster, ns, "wide-train"), 60, "the Job, made without reading the Secret")
        env = {e["name"]: e for e in j["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"
        assert "Forbidden" not in op.logs(), op.logs()[-3000:]
    finally:
        op.stop()
    requests = cluster.audit_events(user)
    assert requests, "the audit log has no request of the operator"
    assert not [e for e in requests if (e.get("objectRef") or {}).get("resource") == "secrets"]
    with pytest.raises(Exception, match="403"):
        cluster.request("GET", f"/api/v1/namespaces/{ns}/secrets/anything", token=cluster.create_token(SYSTEM, name))
