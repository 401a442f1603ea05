"""Helpers for the integration tests: apply resources, read status, and play kubelet.

Pods are pinned to ``runner-node`` (no kubelet there unless hack/podrunner.py runs, which these
tests do not start), so they stay exactly where the test puts them: :func:`kubelet_run`,
:func:`kubelet_exit` patch the pod status as a kubelet would.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml


def wait_for(fn: Callable[[], Any], timeout: float = 30.0, what: str = "condition", interval: float = 0.25) -> Any:
    """Poll ``fn`` until it returns something truthy; fail with the last value after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last={last!r}")


REPO = Path(__file__).resolve().parents[2]
OPERATOR_USER = "system:serviceaccount:kubetune-system:kubetune-operator"  # the operator_identity fixture's


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for an operator's --metrics-port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OperatorProcess:
    """``kubetune operator`` in a subprocess, as the operator's ServiceAccount."""

    def __init__(self, kubeconfig: str, namespaces: list[str], log: Path, extra: list[str] | None = None) -> None:
        self.kubeconfig, self.namespaces, self.log, self.extra = kubeconfig, namespaces, log, extra or []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> OperatorProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
        env.update(KUBECONFIG=self.kubeconfig, KUBETUNE_TRAINER_IMAGE="kubetune/trainer:test")
        args = [sys.executable, "-c", "from kubetune.cli import main; main()", "operator", "--metrics-port", "0",
                *self.extra]
        for ns in self.namespaces:
            args += ["--namespace", ns]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


GROUP = "/apis/kubetune.dev/v1alpha1"
RUNNER = {"kubetune.dev/runner": "true"}


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def ftj_spec(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"uri": "s3://models/tiny"},
        "dataset": {"source": "jsonl", "uri": "s3://data/train.jsonl"},
        "training": {"maxSteps": 10},
        "output": {"uri": "s3://out/run-1"},
        "storage": {"endpoint": "http://minio.storage:9000", "secretRef": {"name": "s3-creds"}},
        "resources": {"gpus": 1, "nodeSelector": dict(RUNNER)},
        "backoffLimit": 2,
        "prepare": {"mode": "inline"},  # one Job: test_cluster_prepare.py runs the CPU prepare stage first
    }
    spec.update(overrides)
    return spec


def create_s3_secret(c: Any, ns: str, name: str = "s3-creds") -> None:
    c.request("POST", f"/api/v1/namespaces/{ns}/secrets", {
        "metadata": {"name": name},
        "stringData": {"AWS_ACCESS_KEY_ID": "test-id", "AWS_SECRET_ACCESS_KEY": "test-secret-value"}})


def create(c: Any, ns: str, kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    plural = {"FineTuneJob": "finetunejobs", "MergeJob": "mergejobs"}[kind]
    return c.request("POST", f"{GROUP}/namespaces/{ns}/{plural}", {
        "apiVersion": "kubetune.dev/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec})


def get(c: Any, ns: str, kind: str, name: str) -> dict[str, Any] | None:
    plural = {"FineTuneJob": "finetunejobs", "MergeJob": "mergejobs"}[kind]
    return c.request("GET", f"{GROUP}/namespaces/{ns}/{plural}/{name}", ok404=True)


def wait_status(c: Any, ns: str, kind: str, name: str, pred: Any, timeout: float = 60, what: str = "") -> dict:
    """Wait until ``pred(status)`` holds; returns the status."""
    def check() -> dict | None:
        obj = get(c, ns, kind, name) or {}
        st = obj.get("status") or {}
        return st if pred(st) else None

    try:
        return wait_for(check, timeout, what or f"{kind}/{name} status")
    except AssertionError as err:
        obj = get(c, ns, kind, name) or {}
        raise AssertionError(f"{err}\nlast status: {json.dumps(obj.get('status'), indent=1)}") from None


def phase_is(phase: str, reason: str | None = None) -> Any:
    def pred(st: dict[str, Any]) -> bool:
        if st.get("phase") != phase:
            return False
        return reason is None or ready(st).get("reason") == reason

    return pred


def ready(st: dict[str, Any]) -> dict[str, Any]:
    return next((c for c in st.get("conditions") or [] if c["type"] == "Ready"), {})


def job(c: Any, ns: str, name: str) -> dict[str, Any] | None:
    return c.request("GET", f"/apis/batch/v1/namespaces/{ns}/jobs/{name}", ok404=True)


def pods(c: Any, ns: str, job_name: str) -> list[dict[str, Any]]:
    items = c.request("GET", f"/api/v1/namespaces/{ns}/pods?labelSelector=batch.kubernetes.io%2Fjob-name%3D{job_name}")
    return sorted(items["items"], key=lambda p: p["metadata"]["creationTimestamp"])


def wait_pod(c: Any, ns: str, job_name: str, count: int = 1, timeout: float = 60) -> dict[str, Any]:
    """The ``count``-th pod of the Job, once it is bound to a node."""
    def check() -> dict[str, Any] | None:
        items = [p for p in pods(c, ns, job_name) if p["spec"].get("nodeName")]
        return items[count - 1] if len(items) >= count else None

    return wait_for(check, timeout, f"pod #{count} of Job {job_name} scheduled")


def _patch_pod_status(c: Any, pod: dict[str, Any], status: dict[str, Any]) -> None:
    meta = pod["metadata"]
    c.request("PATCH", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status", {"status": status},
              content_type="application/merge-patch+json")


def kubelet_run(c: Any, pod: dict[str, Any], ip: str = "10.244.0.10") -> None:
    """Container started (as a kubelet reports it), with pod IP ``ip``."""
    t = now()
    name = pod["spec"]["containers"][0]["name"]
    _patch_pod_status(c, pod, {
        "phase": "Running", "startTime": t, "hostIP": "127.0.0.1", "podIP": ip, "podIPs": [{"ip": ip}],
        "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": t},
                       {"type": "Initialized", "status": "True", "lastTransitionTime": t},
                       {"type": "ContainersReady", "status": "True", "lastTransitionTime": t},
                       {"type": "Ready", "status": "True", "lastTransitionTime": t}],
        "containerStatuses": [{"name": name, "ready": True, "started": True, "restartCount": 0,
                               "image": pod["spec"]["containers"][0]["image"], "imageID": "",
                               "containerID": "containerd://0123", "state": {"running": {"startedAt": t}}}],
    })


def kubelet_exit(c: Any, pod: dict[str, Any], exit_code: int, message: str = "", reason: str | None = None) -> None:
    """Container ended with ``exit_code`` and a termination message."""
    t = now()
    name = pod["spec"]["containers"][0]["name"]
    phase = "Succeeded" if exit_code == 0 else "Failed"
    _patch_pod_status(c, pod, {
        "phase": phase,
        "conditions": [{"type": "Ready", "status": "False", "reason": "PodCompleted", "lastTransitionTime": t},
                       {"type": "ContainersReady", "status": "False", "reason": "PodCompleted",
                        "lastTransitionTime": t}],
        "containerStatuses": [{"name": name, "ready": False, "started": False, "restartCount": 0,
                               "image": pod["spec"]["containers"][0]["image"], "imageID": "",
                               "containerID": "containerd://0123",
                               "state": {"terminated": {"exitCode": exit_code,
                                                        "reason": reason or ("Completed" if exit_code == 0
                                                                             else "Error"),
                                                        "message": message, "startedAt": t, "finishedAt": t,
                                                        "containerID": "containerd://0123"}}}],
    })


def support_name(c: Any, ns: str, kind: str, name: str) -> str:
    """Name of a resource's ConfigMap/ServiceAccount/Role/RoleBinding: ``<name>-train-<uid[:8]>``."""
    uid = get(c, ns, kind, name)["metadata"]["uid"].replace("-", "")[:8]
    return f"{name}-{'train' if kind == 'FineTuneJob' else 'merge'}-{uid}"


def force_delete(c: Any, pod: dict[str, Any]) -> None:
    """What the kubelet does once a terminating pod's containers are gone."""
    meta = pod["metadata"]
    c.request("DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}", {"gracePeriodSeconds": 0},
              ok404=True)


def term_message(reason: str, message: str, **result: Any) -> str:
    return json.dumps({"reason": reason, "message": message, "result": result})


def chart_rules(check_secrets: bool = True) -> list[dict[str, Any]]:
    """The operator's ClusterRole rules exactly as the chart ships them (with checkSecrets, its
    default where the install is scoped to namespaces)."""
    rules = yaml.safe_load((REPO / "charts" / "kubetune" / "files" / "clusterrole-rules.yaml").read_text())
    if check_secrets:
        rules += yaml.safe_load((REPO / "charts" / "kubetune" / "files" / "secrets-rules.yaml").read_text())
    return rules


def nodes_rules() -> list[dict[str, Any]]:
    """The chart's read-only node rules (readNodes, a ClusterRoleBinding)."""
    return yaml.safe_load((REPO / "charts" / "kubetune" / "files" / "nodes-rules.yaml").read_text())


def lease_rules() -> list[dict[str, Any]]:
    return yaml.safe_load((REPO / "charts" / "kubetune" / "files" / "leader-election-rules.yaml").read_text())
