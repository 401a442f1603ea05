"""Operations against a real control plane: leader election, metrics and probes, graceful stop."""

from __future__ import annotations

import datetime as dt
import json
import time
import urllib.error
import urllib.request

import pytest
from clusterkit import (
    OperatorProcess,
    create,
    create_s3_secret,
    free_port,
    ftj_spec,
    job,
    kubelet_run,
    phase_is,
    wait_for,
    wait_pod,
    wait_status,
)

pytestmark = pytest.mark.integration



def now_micro() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


def test_two_replicas_one_leader_and_failover(cluster, ns, operator_identity, tmp_path):
    lease = ["--leader-elect", "--lease-namespace", operator_identity["namespace"], "--lease-name", f"lease-{ns}"]
    ports = [free_port(), free_port()]
    ops = [OperatorProcess(operator_identity["kubeconfig"], [ns], tmp_path / f"op{i}.log",
                           extra=[*lease, "--metrics-port", str(ports[i])]) for i in range(2)]
    try:
        ops[0].start()
        wait_for(lambda: _get(f"http://127.0.0.1:{ports[0]}/readyz")[0] == 200, 60, "first replica ready")
        ops[1].start()
        wait_for(lambda: _get(f"http://127.0.0.1:{ports[1]}/healthz")[0] == 200, 60, "standby alive")
        assert _get(f"http://127.0.0.1:{ports[1]}/readyz")[0] == 503  # standby: not ready, still alive
        assert "kubetune_leader 0.0" in _get(f"http://127.0.0.1:{ports[1]}/metrics")[1]
        assert "kubetune_leader 1.0" in _get(f"http://127.0.0.1:{ports[0]}/metrics")[1]

        create_s3_secret(cluster, ns)
        create(cluster, ns, "FineTuneJob", "one", ftj_spec())
        kubelet_run(cluster, wait_pod(cluster, ns, "one-train"))
        wait_status(cluster, ns, "FineTuneJob", "one", phase_is("Running"), 30)
        text = _get(f"http://127.0.0.1:{ports[0]}/metrics")[1]
        assert 'kubetune_jobs{kind="FineTuneJob",phase="Running"} 1.0' in text
        assert "kubetune_reconcile_duration_seconds_count" in text
        wait_for(lambda: "kubetune_workqueue_depth 0.0" in _get(f"http://127.0.0.1:{ports[0]}/metrics")[1], 10,
                 "an empty work queue once the status is written")
        assert "JobCreated" not in ops[1].logs() and "Handler" not in ops[1].logs()  # the standby did nothing

        ops[0].stop()  # graceful: releases the Lease, the standby takes over at once
        wait_for(lambda: _get(f"http://127.0.0.1:{ports[1]}/readyz")[0] == 200, 30, "standby took over")
        create(cluster, ns, "FineTuneJob", "two", ftj_spec())
        wait_for(lambda: job(cluster, ns, "two-train"), 30, "the new leader reconciles")
        assert ops[0].proc is not None and ops[0].proc.returncode == 0, ops[0].logs()[-2000:]
    finally:
        for op in ops:
            op.stop()


def test_rendered_chart_is_accepted_by_the_api_server(cluster, tmp_path):
    """Every object the chart renders passes the API server's validation (server-side dry run)."""
    import subprocess

    from test_chart import CHART, _helm

    out = subprocess.run([_helm(), "template", "kt", str(CHART), "--namespace", "kubetune-system", "--kube-version",
                          "1.34.0", "--include-crds", "--set", "watchNamespaces={default}"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    (tmp_path / "chart.yaml").write_text(out)
    cluster.kubectl("create", "namespace", "kubetune-system", check=False)
    applied = cluster.kubectl("apply", "--dry-run=server", "-f", str(tmp_path / "chart.yaml"), check=False)
    assert applied.returncode == 0, applied.stderr
    for kind in ("serviceaccount/kt-kubetune", "clusterrole.rbac.authorization.k8s.io/kt-kubetune",
                 "rolebinding.rbac.authorization.k8s.io/kt-kubetune", "deployment.apps/kt-kubetune",
                 "service/kt-kubetune-metrics", "role.rbac.authorization.k8s.io/kt-kubetune-leader-election"):
        assert kind in applied.stdout, applied.stdout


def test_leader_that_loses_its_lease_stops(cluster, ns, operator_identity, tmp_path):
    """Split brain guard: once another identity holds the Lease, the old leader steps down at its next
    renewal -- it never writes the Lease again -- and exits non-zero, well within a lease duration."""
    lease_ns, lease_name = operator_identity["namespace"], f"steal-{ns}"
    op = OperatorProcess(operator_identity["kubeconfig"], [ns], tmp_path / "op.log",
                         extra=["--leader-elect", "--lease-namespace", lease_ns, "--lease-name", lease_name]).start()
    try:
        path = f"/apis/coordination.k8s.io/v1/namespaces/{lease_ns}/leases/{lease_name}"
        wait_for(lambda: "acquired leader lease" in op.logs(), 60, "lease acquired")
        identity = cluster.request("GET", path)["spec"]["holderIdentity"]
        stolen = stolen_wall = None
        deadline = time.monotonic() + 60
        while op.proc.poll() is None and time.monotonic() < deadline:  # keep it stolen, as a rival would
            lease = cluster.request("GET", path)
            lease["spec"].update(holderIdentity="rival", renewTime=now_micro(), leaseDurationSeconds=15)
            try:
                cluster.request("PUT", path, lease)
                if stolen is None:
                    stolen, stolen_wall = time.monotonic(), time.time()
            except Exception:  # noqa: BLE001 - a conflicting renewal: steal again
                pass
            time.sleep(0.5)
        exited = time.monotonic()
        assert op.proc.returncode == 1, op.logs()[-2000:]
        assert "lost the leader lease" in op.logs() and "now held by rival" in op.logs()
        assert stolen is not None and exited - stolen < 15, exited - stolen  # before any standby could take over
        lease_writes = [e for e in cluster.audit_events("system:serviceaccount:kubetune-system:kubetune-operator")
                        if (e.get("userAgent") or "").startswith(f"kubetune-operator/{identity}")
                        and lease_name in e["requestURI"] and e["verb"] == "update"
                        and (e.get("responseStatus") or {}).get("code", 0) < 300
                        and dt.datetime.fromisoformat(e["requestReceivedTimestamp"].replace("Z", "+00:00")).timestamp()
                        >= stolen_wall]
        assert lease_writes == []
    finally:
        op.stop()


def test_cluster_wide_with_json_logs(cluster, ns, operator_identity, tmp_path):
    op = OperatorProcess(operator_identity["kubeconfig"], [], tmp_path / "op.log",
                         extra=["--all-namespaces", "--log-format", "json"]).start()
    try:
        create_s3_secret(cluster, ns)
        create(cluster, ns, "FineTuneJob", "wide", ftj_spec())
        wait_for(lambda: job(cluster, ns, "wide-train"), 60, "Job from the cluster-wide operator")
    finally:
        op.stop()
    lines = [ln for ln in op.logs().splitlines() if ln.strip()]
    assert lines and all(ln.startswith("{") for ln in lines), lines[:5]
    assert any(json.loads(ln).get("message", "").startswith("starting: all namespaces") for ln in lines)
    assert op.proc is not None and op.proc.returncode == 0
