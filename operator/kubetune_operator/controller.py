"""The reconcile loop for FineTuneJob and MergeJob: observe -> act -> write status.

One entry point, :meth:`Controller.reconcile`, called by every kopf handler (create, resume,
update, the resync timer, and the watches on the child Jobs and pods). It is level-based and
idempotent: it reads the resource, the Job and its pods, creates what is missing (HTTP 409 means
it exists: adopt it), aligns ``suspend``, and writes the status derived by
:func:`kubetune_operator.status.derive` when it differs from what is stored.

Errors it raises: :class:`kubetune_operator.kube.ApiError` for unexpected API answers (kopf
retries the handler with backoff). Invalid specs, missing Secrets and missing FineTuneJobs are not
errors: they become a Failed/Stalled (or Pending) status and are re-checked with backoff.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubetune import api
from kubetune_operator import builders, metrics, status, validation
from kubetune_operator.kube import Kube

log = logging.getLogger("kubetune.operator")

RESYNC_SECONDS = 60.0  # safety net for missed watch events on active jobs
BACKOFF_FIRST, BACKOFF_MAX = 5.0, 300.0  # re-check of blocked jobs (missing Secret, FineTuneJob)

Emit = Callable[[dict[str, Any], str, str, str], None]  # (body, "Normal"|"Warning", reason, message)


def utcnow() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def kopf_emit(body: dict[str, Any], type_: str, reason: str, message: str) -> None:
    """Post a Kubernetes Event on the resource through kopf (thread-safe from sync handlers)."""
    import kopf

    kopf.event(body, type=type_, reason=reason, message=message[:1024])  # type: ignore[arg-type]


@dataclass
class _Schedule:
    due: float = 0.0
    failures: int = 0


@dataclass
class Controller:
    kube: Kube
    settings: builders.Settings = field(default_factory=builders.Settings)
    emit: Emit = kopf_emit
    clock: Callable[[], str] = utcnow
    _locks: dict[str, threading.Lock] = field(default_factory=dict)
    _guard: threading.Lock = field(default_factory=threading.Lock)
    _schedule: dict[str, _Schedule] = field(default_factory=dict)

    # -- entry points

    def reconcile(self, kind: str, namespace: str, name: str, timer: bool = False) -> None:
        """Bring one resource's children and status in line with its spec. ``timer``: a periodic
        resync, skipped until the resource is due (backoff for blocked ones)."""
        key = f"{kind}/{namespace}/{name}"
        if timer and time.monotonic() < self._schedule.get(key, _Schedule()).due:
            return
        with self._lock(key), metrics.RECONCILE_SECONDS.labels(kind).time():
            try:
                body = self.kube.get(kind, namespace, name)
                if body is None:  # deleted: the garbage collector removes the children
                    self.forget(kind, namespace, name)
                    return
                blocked = self._reconcile(body)
            except Exception:
                metrics.RECONCILE_ERRORS.labels(kind).inc()
                raise
        sched = self._schedule.setdefault(key, _Schedule())
        sched.failures = sched.failures + 1 if blocked else 0
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (sched.failures - 1)) if blocked else RESYNC_SECONDS
        sched.due = time.monotonic() + delay

    def reconcile_owner_of(self, child: dict[str, Any]) -> None:
        """A child Job or pod changed: reconcile the resource it belongs to."""
        owner = ((child.get("metadata") or {}).get("annotations") or {}).get(builders.LABEL_OWNER, "")
        kind, _, name = owner.partition("/")
        if kind in builders.PLURAL and name:
            self.reconcile(kind, child["metadata"]["namespace"], name)

    def forget(self, kind: str, namespace: str, name: str) -> None:
        key = f"{kind}/{namespace}/{name}"
        self._schedule.pop(key, None)
        metrics.forget(key)

    def _lock(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    # -- the work

    def _reconcile(self, body: dict[str, Any]) -> bool:
        """Returns True when the resource is blocked (validation, waiting) and should be re-checked."""
        kind, meta = body["kind"], body["metadata"]
        old = body.get("status") or {}
        generation = meta.get("generation") or 1
        if status.is_finished(old):  # terminal: never re-run (the Job may be gone with its TTL)
            self._write(body, status.observe_generation(old, generation))
            if kind == "FineTuneJob" and old.get("phase") == "Succeeded":
                self._ensure_merge_job(body)
            return False
        spec, blocked = validation.parse_spec(kind, body.get("spec") or {})
        if spec is None:
            self._write(body, status.derive(kind, body, None, [], self.clock(), blocked=blocked))
            return True
        job = self.kube.get("Job", meta["namespace"], builders.job_name(kind, meta["name"]))
        if job is None:  # validate (and resolve) only before creating: the spec is immutable after that
            blocked, run_spec = self._check(body, spec)
            if blocked is not None:
                self._write(body, status.derive(kind, body, None, [], self.clock(), blocked=blocked))
                return True
            job = self._create_children(body, run_spec)
        if not self._owned(job, body):
            wait = status.Verdict("Pending", "WaitingForCleanup",
                                  f"a Job {job['metadata']['name']} of an earlier resource with this name still "
                                  "exists; waiting for the garbage collector")
            self._write(body, status.derive(kind, body, None, [], self.clock(), blocked=wait))
            return True
        spec_suspend = bool(getattr(spec, "suspend", False))
        job = self._align_suspend(job, spec_suspend, bool(getattr(spec, "queue_name", None)))
        pods = self.kube.list("Pod", meta["namespace"],
                              f"batch.kubernetes.io/controller-uid={job['metadata']['uid']}")
        new = status.derive(kind, body, job, pods, self.clock(), spec_suspend=spec_suspend)
        self._write(body, new)
        if kind == "FineTuneJob" and new["phase"] == "Succeeded":
            self._ensure_merge_job({**body, "status": {**old, **new}})
        return False

    def _check(self, body: dict[str, Any], spec: Any) -> tuple[status.Verdict | None, Any]:
        """Validation that needs the API: (blocking verdict, None) or (None, the resolved spec)."""
        blocked = validation.check_resources(spec, self.settings.trainer_image)
        if blocked:
            return blocked, None
        ns = body["metadata"]["namespace"]
        run_spec = spec
        if isinstance(spec, api.MergeJobSpec) and spec.source.fine_tune_job_ref is not None:
            ref = spec.source.fine_tune_job_ref.name
            ftj = self.kube.get("FineTuneJob", ns, ref)
            blocked = validation.check_fine_tune_job(ref, ftj)
            if blocked:
                return blocked, None
            try:
                run_spec = builders.resolve_merge_spec(spec, ftj)
            except ValueError as err:
                return status.Verdict("Failed", "InvalidSpec", f"cannot resolve the MergeJob: {err}",
                                      stalled=True), None
        needs = validation.secret_needs(run_spec)
        secrets = {n.name: self.kube.get("Secret", ns, n.name) for n in needs}
        blocked = validation.check_secrets(needs, secrets)
        return (blocked, None) if blocked else (None, run_spec)

    def _create_children(self, body: dict[str, Any], spec: Any) -> dict[str, Any]:
        for child in (builders.config_map(body, spec), builders.service_account(body), builders.role(body),
                      builders.role_binding(body)):
            self.kube.create(child, read_existing=False)  # 409: made by an earlier reconcile
        job, created = self.kube.create(builders.job(body, spec, self.settings, builders.initial_suspend(spec)))
        if created:
            self.emit(body, "Normal", "JobCreated", f"created Job {job['metadata']['name']}")
        return job

    @staticmethod
    def _owned(job: dict[str, Any], body: dict[str, Any]) -> bool:
        uid = body["metadata"]["uid"]
        return any(ref.get("uid") == uid for ref in job["metadata"].get("ownerReferences") or [])

    def _align_suspend(self, job: dict[str, Any], want: bool, queued: bool) -> dict[str, Any]:
        """spec.suspend -> Job.spec.suspend. A queue-managed Job is unsuspended by Kueue, not by us."""
        if status.job_condition(job, "Complete") or status.job_condition(job, "Failed"):
            return job
        current = bool(job["spec"].get("suspend"))
        if want == current or (not want and queued):
            return job
        meta = job["metadata"]
        return self.kube.patch("Job", meta["namespace"], meta["name"], {"spec": {"suspend": want}})

    def _write(self, body: dict[str, Any], new: dict[str, Any]) -> None:
        kind, meta = body["kind"], body["metadata"]
        old = body.get("status") or {}
        metrics.observe(f"{kind}/{meta['namespace']}/{meta['name']}", kind, new["phase"])
        patch = status.changed(old, new)
        if not patch:
            return
        self.kube.patch(kind, meta["namespace"], meta["name"], {"status": patch}, subresource="status")
        body["status"] = {**old, **patch}
        if (old.get("phase"), _ready_reason(old)) != (new["phase"], _ready_reason(new)):
            failing = new["phase"] == "Failed" or any(c["type"] == "Stalled" for c in new["conditions"])
            self.emit(body, "Warning" if failing else "Normal", _ready_reason(new),
                      f"{new['phase']}: {new['message']}")

    def _ensure_merge_job(self, body: dict[str, Any]) -> None:
        spec = api.FineTuneJobSpec.model_validate(body["spec"])
        if spec.merge is None or not spec.merge.enabled:
            return
        meta = body["metadata"]
        if (body.get("status") or {}).get("mergeJobName"):
            return
        mj, created = self.kube.create(builders.merge_job(body, spec))
        if created:
            self.emit(body, "Normal", "MergeJobCreated", f"created MergeJob {mj['metadata']['name']}")
        self.kube.patch("FineTuneJob", meta["namespace"], meta["name"],
                        {"status": {"mergeJobName": mj["metadata"]["name"]}}, subresource="status")


def _ready_reason(st: dict[str, Any]) -> str:
    return next((c.get("reason", "") for c in st.get("conditions") or [] if c.get("type") == "Ready"), "")

