"""The Helm chart: static RBAC rules (the ones the integration tests run the operator with), values
that every template reference resolves against, metadata in step with the package."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune import __version__

CHART = Path(__file__).resolve().parents[2] / "charts" / "kubetune"
TEMPLATES = sorted((CHART / "templates").glob("*"))


def _rules(name: str) -> list[dict[str, Any]]:
    return yaml.safe_load((CHART / "files" / name).read_text())


def _flat(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def test_cluster_role_is_exactly_least_privilege():
    got = _flat(_rules("clusterrole-rules.yaml"))
    read = {"get", "list", "watch"}  # no patch: the operator writes only their status (kopf keeps no annotations)
    want = {("kubetune.dev", "finetunejobs", v) for v in read} | \
        {("kubetune.dev", "mergejobs", v) for v in read | {"create"}} | \
        {("kubetune.dev", f"{p}/status", v) for p in ("finetunejobs", "mergejobs") for v in ("get", "patch")} | \
        {("kubetune.dev", f"{p}/finalizers", "update") for p in ("finetunejobs", "mergejobs")} | \
        {("batch", "jobs", v) for v in ("get", "list", "watch", "create", "patch")} | \
        {("", "pods", v) for v in ("list", "watch")} | \
        {("", r, "create") for r in ("configmaps", "serviceaccounts", "services", "events")} | \
        {("", "serviceaccounts", "get")} | \
        {("rbac.authorization.k8s.io", r, "create") for r in ("roles", "rolebindings")} | \
        {("kueue.x-k8s.io", "workloads", v) for v in ("list", "patch")}  # spec.suspend -> Workload spec.active
    assert got == want
    assert not any("*" in x for triple in got for x in triple)
    assert not any(v in ("delete", "deletecollection", "escalate", "bind", "impersonate") for _, _, v in got)
    assert not any(r == "secrets" for _, r, _ in got)  # Secrets only with checkSecrets:
    assert _flat(_rules("secrets-rules.yaml")) == {("", "secrets", "get")}  # one get, never a list or watch


def test_leader_election_role():
    assert _flat(_rules("leader-election-rules.yaml")) == {("coordination.k8s.io", "leases", v)
                                                           for v in ("get", "create", "update")}


def test_pod_role_is_covered_by_the_operator_role():
    """RBAC forbids granting what you do not hold: the per-job Role must be a subset."""
    from kubetune_operator import builders

    body = {"kind": "FineTuneJob", "metadata": {"name": "x", "namespace": "n", "uid": "u"}}
    pod_rules = _flat(builders.role(body)["rules"])
    body["kind"] = "MergeJob"
    pod_rules |= _flat(builders.role(body)["rules"])
    assert pod_rules <= _flat(_rules("clusterrole-rules.yaml"))


def _value_paths(node: Any, prefix: str = "") -> set[str]:
    out = {prefix} if prefix else set()
    if isinstance(node, dict):
        for key, value in node.items():
            out |= _value_paths(value, f"{prefix}.{key}" if prefix else key)
    return out


def test_every_values_reference_exists():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    known = _value_paths(values)
    for template in TEMPLATES:
        text = template.read_text()
        assert text.count("{{") == text.count("}}"), template.name
        for ref in re.findall(r"\.Values\.([A-Za-z0-9_.]+)", text):
            assert ref in known, f"{template.name}: .Values.{ref} is not in values.yaml"
        for ref in re.findall(r'\.Files\.Get "([^"]+)"', text):
            assert (CHART / ref).is_file(), f"{template.name}: {ref} missing"
        for ref in re.findall(r'include "([^"]+)"', text):
            assert f'define "{ref}"' in (CHART / "templates" / "_helpers.tpl").read_text(), ref


def test_chart_metadata_and_defaults():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "kubetune"
    assert chart["appVersion"] == __version__
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["watchNamespaces"] == [] and values["leaderElection"]["enabled"] is True
    assert values["metrics"]["port"] == 8080 and values["metrics"]["serviceMonitor"]["enabled"] is False
    deployment = (CHART / "templates" / "deployment.yaml").read_text()
    for arg in ("--all-namespaces", "--namespace={{ . }}", "--leader-elect", "--metrics-port=", "--log-format="):
        assert arg in deployment
    assert "runAsNonRoot: true" in deployment and "readOnlyRootFilesystem: true" in deployment
    assert "path: /healthz" in deployment and "path: /readyz" in deployment


# ------------------------------------------------------------------------------ rendered with helm
def _helm() -> str:
    import os
    import shutil

    cached = Path(os.environ.get("KUBETUNE_CACHE") or Path.home() / ".cache" / "kubetune") / "helm" / "helm"
    found = os.environ.get("KUBETUNE_HELM") or shutil.which("helm") or (str(cached) if cached.exists() else None)
    assert found, ("helm is needed: GOBIN=~/.cache/kubetune/helm go install helm.sh/helm/v3/cmd/helm@v3.19.0 "
                   "(through the Go module proxy), or set KUBETUNE_HELM")
    return found


def _render(*sets: str) -> list[dict[str, Any]]:
    import subprocess

    args = [_helm(), "template", "kt", str(CHART), "--namespace", "kubetune-system", "--kube-version", "1.34.0"]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.mark.integration
def test_helm_lint_and_render_cluster_wide():
    import subprocess

    lint = subprocess.run([_helm(), "lint", "--strict", "--kube-version", "1.34.0", str(CHART)],
                          capture_output=True, text=True, timeout=120)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _render("clusterWide=true")}
    role = docs[("ClusterRole", "kt-kubetune")]
    assert role["rules"] == _rules("clusterrole-rules.yaml")  # cluster-wide: no Secret readable anywhere
    assert docs[("ClusterRoleBinding", "kt-kubetune")]["subjects"] == [
        {"kind": "ServiceAccount", "name": "kt-kubetune", "namespace": "kubetune-system"}]
    assert docs[("Role", "kt-kubetune-leader-election")]["rules"] == _rules("leader-election-rules.yaml")
    dep = docs[("Deployment", "kt-kubetune")]
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"ghcr.io/kubetune/operator:{__version__}"
    assert container["args"] == ["operator", "--all-namespaces", "--no-check-secrets", "--metrics-port=8080",
                                 "--log-format=json",
                                 "--startup-timeout=900", "--resync-seconds=600", "--run-as-user=1000",
                                 "--leader-elect", "--lease-name=kubetune-operator"]
    assert {"name": "KUBETUNE_TRAINER_IMAGE", "value": "ghcr.io/kubetune/trainer:0.1.0"} in container["env"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert docs[("Service", "kt-kubetune-metrics")]["spec"]["ports"][0]["port"] == 8080
    assert not any(kind == "ServiceMonitor" for kind, _ in docs)
    crds = {d["metadata"]["name"] for d in _render() if d["kind"] == "CustomResourceDefinition"}
    assert crds <= {"finetunejobs.kubetune.dev", "mergejobs.kubetune.dev"}
    with_secrets = {(d["kind"], d["metadata"]["name"]): d for d in _render("clusterWide=true", "checkSecrets=true")}
    assert with_secrets[("ClusterRole", "kt-kubetune")]["rules"] == \
        _rules("clusterrole-rules.yaml") + _rules("secrets-rules.yaml")


@pytest.mark.integration
def test_helm_render_dashboard_and_alerts():
    import json

    docs = _render("metrics.prometheusRule.enabled=true", "metrics.grafanaDashboard.enabled=true")
    rule = next(d for d in docs if d["kind"] == "PrometheusRule")
    assert rule["spec"] == _rules_file("alerts.yaml")
    dashboard = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard"))
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads((CHART / "files" / "dashboard.json").read_text())
    assert json.loads(dashboard["data"]["kubetune.json"]) == shipped
    assert not any(d["kind"] == "PrometheusRule" for d in _render())  # opt-in


def _rules_file(name: str) -> Any:
    return yaml.safe_load((CHART / "files" / name).read_text())


@pytest.mark.integration
def test_helm_default_is_scoped_to_the_release_namespace():
    """Least privilege by default: the ClusterRole bound in the release's own namespace only, the
    operator watching it, and Secrets checked (scoped, so on). The one ClusterRoleBinding grants
    listing nodes and nothing else (readNodes: their GPU memory label); readNodes=false drops it."""
    docs = _render()
    (cluster_binding,) = [d for d in docs if d["kind"] == "ClusterRoleBinding"]
    assert cluster_binding["roleRef"]["name"] == "kt-kubetune-nodes"
    nodes_role = next(d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "kt-kubetune-nodes")
    assert nodes_role["rules"] == _rules("nodes-rules.yaml") == [{"apiGroups": [""], "resources": ["nodes"],
                                                                  "verbs": ["list"]}]
    assert not any(d["kind"] == "ClusterRoleBinding" for d in _render("readNodes=false"))
    bindings = [d for d in docs if d["kind"] == "RoleBinding" and d["roleRef"]["kind"] == "ClusterRole"]
    assert [(b["metadata"]["namespace"], b["roleRef"]["name"]) for b in bindings] == [("kubetune-system",
                                                                                       "kt-kubetune")]
    role = next(d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "kt-kubetune")
    assert role["rules"] == _rules("clusterrole-rules.yaml") + _rules("secrets-rules.yaml")
    args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=kubetune-system" in args and "--all-namespaces" not in args
    assert "--no-check-secrets" not in args


@pytest.mark.integration
def test_helm_render_pod_defaults_and_a_platform_assigned_uid():
    import json

    from kubetune_operator import cli

    docs = _render("runAsUser=null", "podDefaults.imagePullSecrets={registry-creds}",
                   "podDefaults.annotations.example\\.com/team=ml")
    args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--run-as-user=" in args  # OpenShift: the platform assigns the UID
    (flag,) = [a for a in args if a.startswith("--pod-defaults=")]
    defaults = cli._pod_defaults(flag.removeprefix("--pod-defaults="))  # what the operator parses
    assert defaults.image_pull_secrets == ["registry-creds"]
    assert defaults.annotations == {"example.com/team": "ml"}
    assert json.loads(flag.removeprefix("--pod-defaults="))["imagePullSecrets"] == ["registry-creds"]
    assert cli._uid("") is None and cli._uid("1000") == 1000


@pytest.mark.integration
def test_helm_render_watch_namespaces_and_service_monitor():
    docs = _render("watchNamespaces={team-a,team-b}", "metrics.serviceMonitor.enabled=true",
                   "leaderElection.enabled=false")
    kinds = [(d["kind"], d["metadata"].get("namespace")) for d in docs]
    assert ("RoleBinding", "team-a") in kinds and ("RoleBinding", "team-b") in kinds
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "ClusterRoleBinding"] == ["kt-kubetune-nodes"]
    assert not any(d["kind"] == "Role" for d in docs)
    dep = next(d for d in docs if d["kind"] == "Deployment")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args and "--all-namespaces" not in args
    assert "--leader-elect" not in args
    monitor = next(d for d in docs if d["kind"] == "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
