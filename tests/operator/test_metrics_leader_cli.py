"""Metrics/health HTTP server, leader-election decisions, the CLI surface."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from clusterkit import free_port
from kubetune_operator import leader, metrics


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture
def server():
    port = free_port()
    srv = metrics.serve(port, host="127.0.0.1")
    yield f"http://127.0.0.1:{port}"
    srv.shutdown()
    srv.server_close()
    metrics.HEALTH.ready, metrics.HEALTH.alive = False, True


def test_metrics_endpoint_counts_jobs_by_phase(server):
    metrics.observe("FineTuneJob/ns/a", "FineTuneJob", "Running")
    metrics.observe("FineTuneJob/ns/b", "FineTuneJob", "Running")
    metrics.observe("MergeJob/ns/m", "MergeJob", "Pending")
    metrics.observe("FineTuneJob/ns/b", "FineTuneJob", "Succeeded")
    code, text = _get(f"{server}/metrics")
    assert code == 200
    assert 'kubetune_jobs{kind="FineTuneJob",phase="Running"} 1.0' in text
    assert 'kubetune_jobs{kind="FineTuneJob",phase="Succeeded"} 1.0' in text
    assert 'kubetune_jobs{kind="MergeJob",phase="Pending"} 1.0' in text
    assert "kubetune_reconcile_duration_seconds_bucket" in text or "kubetune_reconcile_duration_seconds" in text
    assert "kubetune_reconcile_errors_total" in text
    metrics.forget("FineTuneJob/ns/a")
    metrics.forget("FineTuneJob/ns/b")
    metrics.forget("MergeJob/ns/m")
    _, text = _get(f"{server}/metrics")
    assert 'kubetune_jobs{kind="FineTuneJob",phase="Running"} 0.0' in text


def test_health_and_readiness(server):
    assert _get(f"{server}/healthz") == (200, "ok\n")
    assert _get(f"{server}/readyz")[0] == 503
    metrics.HEALTH.ready = True
    assert _get(f"{server}/readyz") == (200, "ok\n")
    metrics.HEALTH.alive = False
    assert _get(f"{server}/healthz")[0] == 503
    assert _get(f"{server}/nope")[0] == 404


def _lease(holder: str | None, duration: int = 15) -> dict:
    # renewTime from another node's clock, an hour behind: expiry never reads it
    return {"spec": {"holderIdentity": holder, "renewTime": "2026-01-01T11:00:00.000000Z",
                     "leaseDurationSeconds": duration}}


def test_lease_decisions():
    """Observed time: a standby counts from when it saw the record change, on its own clock."""
    seen = 100.0  # when this replica saw the current record (its monotonic clock)
    assert leader.can_acquire(None, "me", seen, seen)  # no lease yet
    assert leader.can_acquire(_lease("me"), "me", seen, seen + 1)  # renew our own
    assert leader.can_acquire(_lease(None), "me", seen, seen + 1)  # released
    assert not leader.can_acquire(_lease("other"), "me", seen, seen + 5)  # held, seen changing 5 s ago
    assert leader.can_acquire(_lease("other"), "me", seen, seen + 15)  # unchanged for its lease duration
    assert not leader.can_acquire(_lease("other", duration=30), "me", seen, seen + 16)


def test_operator_cli_requires_a_scope():
    out = subprocess.run([sys.executable, "-c", "from kubetune.cli import main; main()", "operator"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "--namespace" in out.stderr and "--all-namespaces" in out.stderr


def test_kubetune_help_does_not_import_kopf():
    code = "import sys; from kubetune.cli import main; sys.argv=['kubetune','--help']\n" \
           "try:\n    main()\nexcept SystemExit:\n    pass\nassert 'kopf' not in sys.modules, 'kopf imported'\n" \
           "assert 'kubernetes' not in sys.modules"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "operator" in out.stdout


def test_healthz_names_a_stale_heartbeat():
    now = [100.0]
    health = metrics.Health(clock=lambda: now[0])
    health.beat("worker-1", 300)
    health.beat("event-loop", 30)
    assert health.healthy() == (True, "ok\n")
    now[0] += 60  # the event loop stopped turning; the worker is still within its limit
    assert health.healthy() == (False, "stale: event-loop\n")
    health.beat("event-loop", 30)
    health.forget("worker-1")
    now[0] += 400
    health.beat("event-loop", 30)
    assert health.healthy() == (True, "ok\n")  # a forgotten heartbeat (stopped worker) does not count
