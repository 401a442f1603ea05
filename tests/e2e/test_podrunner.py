"""The pod runner (hack/podrunner.py) against the real local control plane.

Pods are bound to runner-node by the real scheduler (nodeSelector), run as local processes and
reported back like a kubelet would; the Job controller reads what the runner writes.
"""

from __future__ import annotations

import json
import textwrap
from typing import Any

import pytest
from e2e_support import RUNNER_SELECTOR, Cluster, wait_for

pytestmark = pytest.mark.integration


def pod(name: str, script: str, **extra: Any) -> dict[str, Any]:
    """A pod for runner-node running ``python -c script``."""
    container: dict[str, Any] = {"name": "main", "image": "ignored:latest", "command": ["python", "-c",
                                                                                        textwrap.dedent(script)]}
    container.update(extra.pop("container", {}))
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "nodeSelector": RUNNER_SELECTOR, "containers": [container], **extra}}


def get_pod(cluster: Cluster, ns: str, name: str) -> dict[str, Any] | None:
    return cluster.get(f"/api/v1/namespaces/{ns}/pods/{name}")


def finished(cluster: Cluster, ns: str, name: str) -> dict[str, Any] | None:
    p = get_pod(cluster, ns, name)
    return p if p and p["status"].get("phase") in ("Succeeded", "Failed") else None


def log_text(runner: Any, ns: str, name: str) -> str:
    """The pod's log so far ('' before the runner created it)."""
    path = runner.log_path(ns, name)
    return path.read_text() if path is not None and path.exists() else ""


def terminated(p: dict[str, Any]) -> dict[str, Any]:
    return p["status"]["containerStatuses"][0]["state"]["terminated"]


PLAIN = """
    import json, os, pathlib, ssl, sys, urllib.request
    sa = pathlib.Path(os.environ["KUBETUNE_SERVICEACCOUNT_DIR"])
    # a real token bound to this pod: ask the API server who we are
    req = urllib.request.Request(
        f"https://{os.environ['KUBERNETES_SERVICE_HOST']}:{os.environ['KUBERNETES_SERVICE_PORT']}"
        "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        data=json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}).encode(),
        method="POST", headers={"Authorization": "Bearer " + (sa / "token").read_text(),
                                "Content-Type": "application/json"})
    ctx = ssl.create_default_context(cafile=str(sa / "ca.crt"))
    who = json.load(urllib.request.urlopen(req, context=ctx))["status"]["userInfo"]
    out = {
        "config": open(os.environ["CONFIG_FILE"]).read(),
        "secret": os.environ["PASSWORD"],
        "fromcm": os.environ["FROM_CM"],
        "podname": os.environ["POD_NAME"],
        "ns_file": (sa / "namespace").read_text(),
        "expanded": os.environ["EXPANDED"],
        "user": who["username"],
        "bound_pod": who.get("extra", {}).get("authentication.kubernetes.io/pod-name", [""])[0],
        "argv": sys.argv[1:],
    }
    print("hello from the pod runner")
    open(os.environ["KUBETUNE_TERMINATION_LOG"], "w").write(json.dumps(out))
"""


def test_plain_pod_succeeds_with_env_volumes_token_and_message(cluster, namespace, runner):
    cluster.apply(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"},
         "data": {"settings.json": '{"lr": 0.1}', "mode": "fast"}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"}, "stringData": {"password": "s3cr3t"}},
        namespace=namespace)
    script = PLAIN
    manifest = pod("plain", script, container={
        "args": ["/etc/cfg/settings.json", "--out=/work/x"],
        "env": [
            {"name": "CONFIG_FILE", "value": "/etc/cfg/settings.json"},
            {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
            {"name": "FROM_CM", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "mode"}}},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "EXPANDED", "value": "$(FROM_CM)-$(POD_NAME)"},
        ],
        "volumeMounts": [{"name": "cfg", "mountPath": "/etc/cfg"}, {"name": "work", "mountPath": "/work"}],
    }, volumes=[{"name": "cfg", "configMap": {"name": "cfg"}}, {"name": "work", "emptyDir": {}}])
    cluster.apply(manifest, namespace=namespace)

    p = wait_for(lambda: finished(cluster, namespace, "plain"), 60, "pod plain to finish")
    st = p["status"]
    assert st["phase"] == "Succeeded", st
    term = terminated(p)
    assert term["exitCode"] == 0 and term["reason"] == "Completed"
    assert term["startedAt"] <= term["finishedAt"]
    out = json.loads(term["message"])
    assert out["config"] == '{"lr": 0.1}'
    assert out["secret"] == "s3cr3t"
    assert out["fromcm"] == "fast"
    assert out["podname"] == "plain"
    assert out["expanded"] == "fast-plain"
    assert out["ns_file"] == namespace
    assert out["user"] == f"system:serviceaccount:{namespace}:default"
    assert out["bound_pod"] == "plain"  # TokenRequest bound to this pod
    # args starting with a mountPath point at the local folders
    assert out["argv"][0].endswith("/volumes/cfg/settings.json") and not out["argv"][0].startswith("/etc/cfg")
    assert out["argv"][1].startswith("--out=") and out["argv"][1].endswith("/volumes/work/x")
    assert {c["type"]: c["status"] for c in st["conditions"]}["Ready"] == "False"
    assert st["podIP"] == "127.0.0.1" and st["startTime"]
    assert "hello from the pod runner" in log_text(runner, namespace, "plain")


def test_failing_pod_fails_with_exit_code_and_log_fallback(cluster, namespace, runner):
    cluster.apply(
        pod("bad-file", "import os; open(os.environ['KUBETUNE_TERMINATION_LOG'], 'w').write('bad data'); exit(3)"),
        pod("bad-logs", "print('first'); print('the last words'); raise SystemExit(5)",
            container={"terminationMessagePolicy": "FallbackToLogsOnError"}),
        namespace=namespace)
    p = wait_for(lambda: finished(cluster, namespace, "bad-file"), 60, "bad-file to finish")
    assert p["status"]["phase"] == "Failed"
    assert terminated(p)["exitCode"] == 3 and terminated(p)["reason"] == "Error"
    assert terminated(p)["message"] == "bad data"
    p = wait_for(lambda: finished(cluster, namespace, "bad-logs"), 60, "bad-logs to finish")
    assert p["status"]["phase"] == "Failed"
    assert terminated(p)["exitCode"] == 5
    assert terminated(p)["message"].strip().splitlines()[-1] == "the last words"


SIGTERM_SCRIPT = """
    import os, signal, sys, time
    def on_term(*_):
        print("got SIGTERM, saving", flush=True)
        open(os.environ["KUBETUNE_TERMINATION_LOG"], "w").write("preempted")
        sys.exit(7)
    signal.signal(signal.SIGTERM, on_term)
    print("running", flush=True)
    time.sleep(300)
"""


def test_deleted_pod_gets_sigterm_then_is_removed(cluster, namespace, runner):
    cluster.apply(pod("term", SIGTERM_SCRIPT, terminationGracePeriodSeconds=30), namespace=namespace)
    p = wait_for(lambda: (q := get_pod(cluster, namespace, "term")) and q["status"].get("phase") == "Running" and q,
                 60, "pod term Running")
    running = p["status"]["containerStatuses"][0]
    assert running["ready"] is True and running["state"]["running"]["startedAt"]
    assert {c["type"]: c["status"] for c in p["status"]["conditions"]}["Ready"] == "True"
    wait_for(lambda: "running" in log_text(runner, namespace, "term"), 30, "the process to start")
    cluster.kubectl("delete", "pod", "term", "-n", namespace, "--wait=false")
    wait_for(lambda: get_pod(cluster, namespace, "term") is None, 30, "pod term to be removed")
    assert "got SIGTERM, saving" in log_text(runner, namespace, "term")
    run = next(r for r in runner.runs.values() if r.namespace == namespace and r.name == "term")
    assert run.result is not None and run.result.exit_code == 7 and run.result.message == "preempted"


def test_sigterm_ignored_is_killed_after_grace(cluster, namespace, runner):
    script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); " \
             "time.sleep(300)"
    cluster.apply(pod("stubborn", script, terminationGracePeriodSeconds=1), namespace=namespace)
    wait_for(lambda: "up" in log_text(runner, namespace, "stubborn"), 60, "the process to start")
    cluster.kubectl("delete", "pod", "stubborn", "-n", namespace, "--wait=false")
    wait_for(lambda: get_pod(cluster, namespace, "stubborn") is None, 30, "pod stubborn to be removed")
    run = next(r for r in runner.runs.values() if r.namespace == namespace and r.name == "stubborn")
    assert run.result is not None and run.result.exit_code == 137


def test_memory_limit_oomkilled(cluster, namespace, runner):
    script = "import time; x = bytearray(400 * 2**20); x[::4096] = b'1' * len(x[::4096]); time.sleep(60)"
    cluster.apply(pod("hog", script, container={"resources": {"limits": {"memory": "128Mi"}}}), namespace=namespace)
    p = wait_for(lambda: finished(cluster, namespace, "hog"), 60, "pod hog to finish")
    assert p["status"]["phase"] == "Failed"
    assert terminated(p)["reason"] == "OOMKilled" and terminated(p)["exitCode"] == 137


def test_missing_secret_waits_then_runs(cluster, namespace, runner):
    manifest = pod("later", "import os; print(os.environ['TOKEN'])", container={
        "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "late", "key": "token"}}}]})
    cluster.apply(manifest, namespace=namespace)

    def waiting_reason() -> str | None:
        p = get_pod(cluster, namespace, "later")
        statuses = (p or {}).get("status", {}).get("containerStatuses") or []
        return statuses[0]["state"].get("waiting", {}).get("reason") if statuses else None

    assert wait_for(lambda: waiting_reason() == "CreateContainerConfigError" and "yes", 30, "config error")
    cluster.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "late"},
                   "stringData": {"token": "now-here"}}, namespace=namespace)
    p = wait_for(lambda: finished(cluster, namespace, "later"), 60, "pod later to finish")
    assert p["status"]["phase"] == "Succeeded"
    assert "now-here" in log_text(runner, namespace, "later")


def test_job_controller_reads_runner_status(cluster, namespace, runner):
    """A batch/v1 Job with the operator's pod failure policy: exit 3 fails the Job at once."""
    def job(name: str, code: int) -> dict[str, Any]:
        spec = pod(name, f"raise SystemExit({code})")["spec"]
        return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
                "spec": {"backoffLimit": 3, "template": {"spec": spec},
                         "podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {
                             "containerName": "main", "operator": "In", "values": [2, 3]}}]}}}

    cluster.apply(job("ok", 0), job("permanent", 3), namespace=namespace)

    def condition(name: str) -> dict[str, Any] | None:
        j = cluster.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}") or {}
        conds = [c for c in j.get("status", {}).get("conditions") or []
                 if c["type"] in ("Complete", "Failed") and c["status"] == "True"]
        return conds[0] if conds else None

    assert wait_for(lambda: condition("ok"), 90, "Job ok to finish")["type"] == "Complete"
    failed = wait_for(lambda: condition("permanent"), 90, "Job permanent to finish")
    assert failed["type"] == "Failed" and failed["reason"] == "PodFailurePolicy"
    j = cluster.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/permanent")
    assert j["status"].get("failed") == 1  # no retries
