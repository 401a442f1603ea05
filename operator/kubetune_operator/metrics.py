"""Prometheus metrics and the health endpoints, on one small HTTP server.

    GET /metrics   Prometheus text format
    GET /healthz   200 while the process is healthy: every heartbeat is fresh -- kopf's event loop
                   (beats every 5 s unless blocked), each reconcile worker (idle or busy, not stuck
                   in one reconcile for minutes), the relist (a successful LIST of everything at
                   least every 3 resync periods) -- or this replica is a standby; 503 naming the
                   stale heartbeat otherwise (the kubelet then restarts the container)
    GET /readyz    200 once this replica leads and kopf is running; 503 otherwise

Metrics: ``kubetune_jobs{kind,phase}`` (resources by phase), ``kubetune_reconcile_duration_seconds``
(histogram, by kind), ``kubetune_reconcile_errors_total`` (by kind), ``kubetune_leader`` (1 when
this replica holds the Lease), ``kubetune_workqueue_depth`` (resources waiting for a reconcile
worker: a queue that stays long means the operator or the API server cannot keep up).
"""

from __future__ import annotations

import threading
import time
from collections import Counter as _Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest

PHASES = ("Pending", "Running", "Succeeded", "Failed", "Suspended")
KINDS = ("FineTuneJob", "MergeJob")

JOBS = Gauge("kubetune_jobs", "FineTuneJobs and MergeJobs by phase", ["kind", "phase"])
RECONCILE_SECONDS = Histogram("kubetune_reconcile_duration_seconds", "Time spent in one reconcile", ["kind"],
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
RECONCILE_ERRORS = Counter("kubetune_reconcile_errors_total", "Reconciles that raised an error", ["kind"])
LEADER = Gauge("kubetune_leader", "1 when this replica holds the leader Lease")
QUEUE_DEPTH = Gauge("kubetune_workqueue_depth", "Resources waiting for a reconcile worker")
BY_REASON = Gauge("kubetune_jobs_by_reason", "Unfinished FineTuneJobs and MergeJobs by the reason of their Ready "
                  "condition (Running, WaitingForAdmission, Preempted, SecretNotFound, ImagePullBackOff, ...)",
                  ["kind", "reason"])
COMPLETIONS = Counter("kubetune_job_completions_total", "Runs that ended, by kind, phase (Succeeded, Failed) and "
                      "reason", ["kind", "phase", "reason"])

# The names controller-runtime and client-go export, so dashboards and alerts made for any
# controller work here too (``name``/``controller`` is "kubetune").
QUEUE_NAME = "kubetune"
_SECONDS = (0.001, 0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
WORKQUEUE_DEPTH = Gauge("workqueue_depth", "Current depth of the work queue", ["name"])
WORKQUEUE_ADDS = Counter("workqueue_adds_total", "Adds handled by the work queue", ["name"])
WORKQUEUE_RETRIES = Counter("workqueue_retries_total", "Retries (backed-off re-adds) handled by the work queue",
                            ["name"])
WORKQUEUE_QUEUE_SECONDS = Histogram("workqueue_queue_duration_seconds", "How long an item stays in the work queue "
                                    "before a worker takes it", ["name"], buckets=_SECONDS)
WORKQUEUE_WORK_SECONDS = Histogram("workqueue_work_duration_seconds", "How long a worker takes on an item",
                                   ["name"], buckets=_SECONDS)
RECONCILES = Counter("controller_runtime_reconcile_total", "Reconciles by result (success, error, requeue)",
                     ["controller", "result"])
REST_REQUESTS = Counter("rest_client_requests_total", "Requests to the API server by status code, method and host",
                        ["code", "method", "host"])

for _metric in (WORKQUEUE_DEPTH, WORKQUEUE_ADDS, WORKQUEUE_RETRIES, WORKQUEUE_QUEUE_SECONDS, WORKQUEUE_WORK_SECONDS):
    _metric.labels(QUEUE_NAME)  # exported from the start, at 0, as controller-runtime does
for _result in ("success", "error", "requeue"):
    RECONCILES.labels(QUEUE_NAME, _result)

_phases: dict[str, tuple[str, str]] = {}
_reasons: dict[str, tuple[str, str, float]] = {}  # key -> (kind, reason, since: epoch seconds), unfinished only
_lock = threading.Lock()
for _k in KINDS:
    for _p in PHASES:
        JOBS.labels(_k, _p).set(0)


def _refresh() -> None:
    counts = _Counter(_phases.values())
    for kind in KINDS:
        for phase in PHASES:
            JOBS.labels(kind, phase).set(counts.get((kind, phase), 0))
    reasons = _Counter((kind, reason) for kind, reason, _ in _reasons.values())
    for labels in {*reasons, *((k, r) for k, r in _seen_reasons)}:
        BY_REASON.labels(*labels).set(reasons.get(labels, 0))
    _seen_reasons.update(reasons)


_seen_reasons: set[tuple[str, str]] = set()  # series once exported stay, at 0


def observe(key: str, kind: str, phase: str, reason: str | None = None, since: float | None = None) -> None:
    """Record the phase of one resource (``kind/namespace/name``), and while it is unfinished the
    reason of its Ready condition and since when (epoch seconds) it holds."""
    with _lock:
        if phase in ("Succeeded", "Failed") or reason is None:
            changed = _reasons.pop(key, None) is not None
        else:
            entry = (kind, reason, since if since is not None else time.time())
            changed = _reasons.get(key, (None, None))[:2] != entry[:2]
            if changed:
                _reasons[key] = entry
        if _phases.get(key) != (kind, phase) or changed:
            _phases[key] = (kind, phase)
            _refresh()


def forget(key: str) -> None:
    """The resource is gone."""
    with _lock:
        gone = _phases.pop(key, None) is not None
        gone = _reasons.pop(key, None) is not None or gone
        if gone:
            _refresh()


def completed(kind: str, phase: str, reason: str) -> None:
    """A run ended (counted once, when its terminal status is written)."""
    COMPLETIONS.labels(kind, phase, reason).inc()


class _OldestCollector:
    """``kubetune_oldest_in_reason_seconds``: per kind and reason, how long the resource that has
    held it longest has held it (computed at scrape time): what a "stuck job" or "queue wait"
    alert compares with a limit."""

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily("kubetune_oldest_in_reason_seconds", "Longest time an unfinished job has held "
                                   "the reason of its Ready condition, by kind and reason", labels=["kind", "reason"])
        now = time.time()
        with _lock:
            oldest: dict[tuple[str, str], float] = {}
            for kind, reason, since in _reasons.values():
                oldest[(kind, reason)] = min(oldest.get((kind, reason), since), since)
        for (kind, reason), since in sorted(oldest.items()):
            family.add_metric([kind, reason], max(0.0, now - since))
        yield family


REGISTRY.register(_OldestCollector())


class Health:
    """What /healthz and /readyz answer; set by the CLI as the operator starts, leads, stops, and
    by the heartbeats of the parts that must keep moving."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self.alive = True
        self.ready = False
        self._clock = clock
        self._beats: dict[str, tuple[float, float]] = {}  # name -> (last beat, max age)
        self._lock = threading.Lock()

    def beat(self, name: str, max_age: float) -> None:
        """``name`` is alive now and must beat again within ``max_age`` seconds."""
        with self._lock:
            self._beats[name] = (self._clock(), max_age)

    def forget(self, name: str) -> None:
        with self._lock:
            self._beats.pop(name, None)

    def stale(self) -> list[str]:
        """The heartbeats that are late."""
        now = self._clock()
        with self._lock:
            return sorted(n for n, (t, age) in self._beats.items() if now - t > age)

    def healthy(self) -> tuple[bool, str]:
        if not self.alive:
            return False, "unhealthy\n"
        late = self.stale()
        return (False, f"stale: {', '.join(late)}\n") if late else (True, "ok\n")


HEALTH = Health()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
        elif path in ("/healthz", "/livez"):
            ok, text = HEALTH.healthy()
            self._send(200 if ok else 503, text.encode())
        elif path == "/readyz":
            self._send(200 if HEALTH.ready else 503, b"ok\n" if HEALTH.ready else b"not ready\n")
        else:
            self._send(404, b"not found\n")

    def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep probes out of the logs
        return


def serve(port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Start the metrics/health server in a daemon thread; returns it (``.shutdown()`` stops it)."""
    server = ThreadingHTTPServer((host, port), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
