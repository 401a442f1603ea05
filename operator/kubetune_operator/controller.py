"""The reconcile loop for FineTuneJob and MergeJob: observe -> act -> write status.

kopf's watch handlers (handlers.py) only feed the :class:`~kubetune_operator.cache.Cache` and mark
the owning resource's key dirty in a :class:`~kubetune_operator.workqueue.WorkQueue`; ``workers``
threads take keys and call :meth:`Controller.reconcile`. That is level-based and idempotent: it
reads the resource, its Job and its pods from the cache, creates what is missing (HTTP 409 means
it exists: adopt it), aligns ``suspend``, and writes the status derived by
:func:`kubetune_operator.status.derive` when it differs from what is stored. A reconcile that
changes nothing makes no API call, so watch events (including the echo of our own writes) are cheap.

Re-checks: a blocked resource (missing Secret, MergeJob waiting for its FineTuneJob, a create the
API server refused with 403) is retried with backoff (5 s .. 5 min) and shows as Pending with a
Stalled condition; an API error likewise. ``Failed`` is always final: an invalid spec (immutable),
a create refused as invalid (422), a FineTuneJob that failed, a Job lost before its end was
recorded, a pod stuck in ImagePullBackOff/Unschedulable/... past the startup timeout.

Faults (docs/operator.md, "Under faults"):

* the Job's ``ttlSecondsAfterFinished`` is set only after the terminal status is written, and a Job
  that vanished once ``status.jobName`` was recorded is never created again (JobLost, or the result
  the pod reported is kept);
* every ``resync_seconds`` the resources, Jobs and pods are listed again and whatever the lists no
  longer show is pruned from the cache (client-go's Replace: a watch gap leaves no ghost), then
  every unfinished resource is reconciled and its four support objects re-created if missing;
* a status write answered 404 forgets the resource; terminal status writes carry the cached
  resourceVersion (a stale view cannot overwrite a newer status) and the CRD refuses any change of
  a terminal phase.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from kubetune import api, contract
from kubetune_operator import builders, kueue, metrics, status, validation
from kubetune_operator.cache import PREPARE, TRAIN, Cache, Key, key_of
from kubetune_operator.kube import ApiError, Fenced, Kube
from kubetune_operator.workqueue import WorkQueue

log = logging.getLogger("kubetune.operator")

RESYNC_SECONDS = 600.0  # relist everything, prune what vanished, reconcile what is unfinished
RESYNC_FIRST = 30.0  # the first relist after start: closes the window between prefill and kopf's own lists
HEARTBEAT_SECONDS = 5.0  # an idle worker beats this often (/healthz)
WORKER_STUCK_SECONDS = 300.0  # a worker silent this long is stuck in one reconcile: /healthz fails
CHILD_CHECK_SECONDS = 30.0  # a Job without a pod re-checks its support objects at most this often
NODES_SECONDS = 60.0  # GPU nodes (their nvidia.com/gpu.memory label) are listed at most this often
BACKOFF_FIRST, BACKOFF_MAX = 5.0, 300.0  # re-check of blocked resources and of failed reconciles
WORKERS = 8
SECRET_TTL = 10.0  # seconds a Secret seen to exist is not read again (absence is never cached)
# Events: one per phase change (not into Pending: JobCreated says it), one per failure/stall, and
# these Pending/Running reasons a user must see in `kubectl describe`. Not every Pending sub-step.
NOTABLE_REASONS = {"Unschedulable", "Retrying", "WaitingForCleanup", "Preempted", "Evicted"}
WORKLOAD_READ_SECONDS = 30.0  # a queued job waiting for admission: its Workload is read at most this often

Emit = Callable[[dict[str, Any], str, str, str], None]  # (body, "Normal"|"Warning", reason, message)


def utcnow() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def kopf_emit(body: dict[str, Any], type_: str, reason: str, message: str) -> None:
    """Post a Kubernetes Event on the resource through kopf's queue (thread-safe; needs kopf's
    context variables). An Event that cannot be queued is logged, never fails a reconcile."""
    import kopf

    try:
        kopf.event(body, type=type_, reason=reason, message=message[:1024])  # type: ignore[arg-type]
    except Exception as err:  # noqa: BLE001 - Events are best effort
        log.warning("cannot post the Event %s on %s: %r", reason, body["metadata"].get("name"), err)


def _name(key: Key) -> str:
    return "/".join(key)


@dataclass
class Controller:
    kube: Kube
    settings: builders.Settings = field(default_factory=builders.Settings)
    emit: Emit = kopf_emit
    clock: Callable[[], str] = utcnow
    cache: Cache = field(default_factory=Cache)
    queue: WorkQueue = field(default_factory=lambda: WorkQueue(BACKOFF_FIRST, BACKOFF_MAX))
    workers: int = WORKERS
    _threads: list[threading.Thread] = field(default_factory=list)
    _secrets: dict[tuple[str, str], tuple[float, dict[str, Any]]] = field(default_factory=dict)
    _secrets_lock: threading.Lock = field(default_factory=threading.Lock)
    _children_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(4, thread_name_prefix="children"))
    namespaces: list[str] | None = None  # None: every namespace (set by prefill)
    resync_seconds: float = RESYNC_SECONDS
    _children_checked: dict[Key, float] = field(default_factory=dict)
    _kueue_aligned: kueue.Aligned = field(default_factory=kueue.Aligned)  # what Workloads were aligned to, per Job
    _workloads_read: dict[str, tuple[float, Any]] = field(default_factory=dict)  # Job uid -> (when, state)
    _workloads_lock: threading.Lock = field(default_factory=threading.Lock)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _nodes: tuple[float, list[dict[str, Any]] | None] = (-1e9, None)  # (when, GPU nodes with a memory label)

    def __post_init__(self) -> None:
        metrics.QUEUE_DEPTH.set_function(lambda: len(self.queue))
        metrics.WORKQUEUE_DEPTH.labels(metrics.QUEUE_NAME).set_function(lambda: len(self.queue))

    # -- lifecycle

    def prefill(self, namespaces: list[str] | None) -> None:
        """List the Jobs and pods the operator made (``None``: all namespaces) before the watches start,
        so the first reconciles see existing children instead of re-creating them (a cache sync)."""
        selector = contract.LABEL_KIND
        self.namespaces = namespaces
        for ns in namespaces or [""]:
            for kind in ("Job", "Pod"):
                for item in self.kube.list(kind, ns, selector):
                    self.cache.put_child({**item, "kind": kind})
        log.info("cache filled: %s", self.cache.sizes())

    def start(self) -> None:
        """Start the workers (once). Called from kopf's event handlers: each worker runs in a copy of
        the caller's context variables, where kopf keeps what ``kopf.event`` needs (its Event queue
        exists only once the watches run, not yet in startup handlers)."""
        if self._threads:
            return
        for i in range(self.workers):
            thread = threading.Thread(target=contextvars.copy_context().run, args=(self._work,),
                                      name=f"reconcile-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        resync = threading.Thread(target=contextvars.copy_context().run, args=(self._resync_loop,),
                                  name="resync", daemon=True)
        resync.start()
        self._threads.append(resync)

    def stop(self, timeout: float = 10.0) -> None:
        """Let the workers finish their current reconcile (``timeout`` seconds in all; they are
        daemon threads, so one stuck in a request does not hold the exit)."""
        self._stopping.set()
        self.queue.shutdown()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._children_pool.shutdown(wait=False, cancel_futures=True)

    def _work(self) -> None:
        name = f"worker-{threading.current_thread().name}"
        while not (self._stopping.is_set() or self.queue.closed):
            metrics.HEALTH.beat(name, WORKER_STUCK_SECONDS)
            key = self.queue.get(timeout=HEARTBEAT_SECONDS)
            if key is None:
                continue  # idle (or shut down: the loop ends)
            try:
                self.reconcile(key)  # type: ignore[arg-type]
            finally:
                self.queue.done(key)
        metrics.HEALTH.forget(name)

    # -- the relist (watch gaps)

    def _resync_loop(self) -> None:
        delay = min(RESYNC_FIRST, self.resync_seconds)
        metrics.HEALTH.beat("relist", 3 * self.resync_seconds + delay)
        while not self._stopping.wait(delay):
            delay = self.resync_seconds
            try:
                self.resync()
                metrics.HEALTH.beat("relist", 3 * self.resync_seconds)
            except Exception as err:  # noqa: BLE001 - the next round tries again
                log.warning("resync failed: %s", err, exc_info=not isinstance(err, (ApiError, OSError)))
        metrics.HEALTH.forget("relist")

    def resync(self) -> None:
        """List the resources, Jobs and pods again (one LIST per kind and namespace), replace the
        cache's view with what the lists show -- dropping what vanished in a watch gap, which kopf's
        relist after a 410 does not report -- and reconcile every unfinished resource."""
        selector = contract.LABEL_KIND
        dirty: set[Key] = set()
        for ns in self.namespaces or [""]:
            for kind in ("FineTuneJob", "MergeJob"):
                items, rv = self._list(kind, ns, None)
                for item in items:
                    self.cache.put({**item, "kind": kind})
                for gone in self.cache.prune(kind, ns, {f"{i['metadata']['namespace']}/{i['metadata']['name']}"
                                                        for i in items}, rv):
                    log.info("%s vanished while unwatched: forgotten", _name(gone))
                    self._forget(gone)
            for kind in ("Job", "Pod"):
                items, rv = self._list(kind, ns, selector)
                for item in items:
                    self.cache.put_child({**item, "kind": kind})
                dirty |= self.cache.prune_children(kind, ns, {i["metadata"]["uid"] for i in items}, rv)
        for key in self.cache.keys():
            body = self.cache.get(key) or {}
            if not status.is_finished(body.get("status")):
                self._children_checked.pop(key, None)  # re-check its support objects too
                dirty.add(key)
        for key in dirty:
            self.queue.add(key)
        log.info("resync: cache %s, %d resources to reconcile", self.cache.sizes(), len(dirty))

    def _list(self, kind: str, namespace: str, selector: str | None) -> tuple[list[dict[str, Any]], int | None]:
        answer = self.kube.request("GET", Kube.path(kind, namespace or None),
                                   query={"labelSelector": selector} if selector else None)
        try:
            rv: int | None = int(answer["metadata"]["resourceVersion"])
        except (KeyError, TypeError, ValueError):
            rv = None
        return list(answer.get("items") or []), rv

    def _forget(self, key: Key) -> None:
        self.cache.drop(key)
        self.cache.forget_children(key)
        self.queue.discard(key)
        self._children_checked.pop(key, None)
        metrics.forget(_name(key))

    # -- what the watches report (called from kopf's event loop: no API calls here)

    def observed(self, body: dict[str, Any], deleted: bool = False) -> None:
        """A FineTuneJob or MergeJob changed (or was listed, or deleted)."""
        key = key_of(body)
        if deleted:
            self._forget(key)
            return
        self.cache.put(body)
        self.queue.add(key)
        if key[0] == "FineTuneJob":  # MergeJobs and chained FineTuneJobs waiting for it
            for merge_key in self.cache.merge_jobs_referencing(key[1], key[2]):
                self.queue.add(merge_key)

    def observed_child(self, child: dict[str, Any], deleted: bool = False) -> None:
        """A Job or pod with the kubetune kind label changed: file it, reconcile its owner."""
        owner = self.cache.drop_child(child) if deleted else self.cache.put_child(child)
        if owner is not None:
            self.queue.add(owner)

    # -- one reconcile

    def reconcile(self, key: Key) -> None:
        """Bring one resource's children and status in line with its spec; schedule its re-check."""
        kind = key[0]
        body = self.cache.get(key)
        if body is None:  # deleted: the garbage collector removes the children
            return
        with metrics.RECONCILE_SECONDS.labels(kind).time():
            try:
                blocked = self._reconcile(key, body)
            except Gone:
                log.info("%s is gone (HTTP 404 on its status): forgotten", _name(key))
                self._forget(key)
                metrics.RECONCILES.labels(metrics.QUEUE_NAME, "success").inc()
                return
            except Exception as err:  # noqa: BLE001 - any failure: log, count, retry with backoff
                metrics.RECONCILE_ERRORS.labels(kind).inc()
                metrics.RECONCILES.labels(metrics.QUEUE_NAME, "error").inc()
                delay = self.queue.retry(key)
                log.warning("reconcile %s failed (retry in %.0fs): %s", _name(key), delay, err,
                            exc_info=not isinstance(err, (ApiError, Fenced)))
                return
        metrics.RECONCILES.labels(metrics.QUEUE_NAME, "requeue" if blocked else "success").inc()
        if blocked:
            self.queue.retry(key)
            return
        self.queue.forget(key)

    # -- the work

    def _reconcile(self, key: Key, body: dict[str, Any]) -> bool:
        """Returns True when the resource is blocked (waiting) and should be re-checked."""
        kind, meta = body["kind"], body["metadata"]
        old = body.get("status") or {}
        generation = meta.get("generation") or 1
        if status.is_finished(old):  # terminal: never re-run (the Job may be gone with its TTL)
            self._write(body, status.observe_generation(old, generation))
            self._wind_down(key, body, old)
            if kind == "FineTuneJob" and old.get("phase") == "Succeeded":
                self._ensure_merge_job(body)
            return False
        spec, invalid = validation.parse_spec(kind, body.get("spec") or {})
        if spec is None:  # the spec is immutable: no retry
            self._write(body, status.derive(kind, body, None, [], self.clock(), blocked=invalid))
            return False
        job = self.cache.job(key)
        if job is None and old.get("jobName"):  # made once already: never twice
            job = self._lost_job(key, body, old)
            if job is None:
                return False
        if job is None:  # validate (and resolve) only before creating: the spec is immutable after that
            blocked, run_spec = self._check(body, spec)
            if blocked is None and builders.prepares(run_spec):
                waiting = self._prepare_stage(key, body, run_spec)
                if waiting is not None:  # not prepared yet (or the prepare stage failed): no GPU Job
                    return waiting
            if blocked is None:
                job, blocked = self._create_children(body, run_spec)
                self._children_checked[key] = time.monotonic()
            if blocked is not None:
                self._write(body, status.derive(kind, body, None, [], self.clock(), blocked=blocked))
                return blocked.phase != "Failed"
        if not self._owned(job, body):
            wait = status.Verdict("Pending", "WaitingForCleanup",
                                  f"a Job {job['metadata']['name']} of an earlier resource with this name still "
                                  "exists; waiting for the garbage collector")
            self._write(body, status.derive(kind, body, None, [], self.clock(), blocked=wait))
            return True
        spec_suspend = bool(getattr(spec, "suspend", False))
        job = self._align_suspend(job, spec_suspend, bool(spec.queue_name), key)
        pods = self.cache.pods(key, job["metadata"]["uid"])
        now = self.clock()
        new = status.derive(kind, body, job, pods, now, spec_suspend=spec_suspend)
        timeout = spec.startup_timeout_seconds or self.settings.startup_timeout_seconds
        gave_up, wait = status.startup_timeout(new, job, pods, now, timeout)
        if gave_up is not None:
            new = status.derive(kind, body, job, pods, now, blocked=gave_up)
        elif wait is not None:
            self.queue.add_after(key, wait + 1.0)
        if spec.queue_name and status.ready_reason(new) == "WaitingForAdmission":
            detail = self._workload_state(key, job)  # Kueue's reason: which quota is short, or a preemption
            if detail is not None:
                new = status.derive(kind, body, job, pods, now, blocked=status.Verdict("Pending", *detail))
                if detail[0] == "WaitingForAdmission" and old.get("message") != detail[1]:
                    self.emit(body, "Normal", "WaitingForAdmission", detail[1])  # inadmissible: why, once
        if status.ready_reason(new) in ("Starting", "Retrying"):  # no pod: can the Job controller make one?
            self._check_children(key, body, spec)
        self._write(body, new, precondition=new["phase"] in status.TERMINAL)
        if new["phase"] in status.TERMINAL:
            self._wind_down(key, body, new)
        if kind == "FineTuneJob" and new["phase"] == "Succeeded":
            self._ensure_merge_job({**body, "status": {**old, **new}})
        return False

    def _prepare_stage(self, key: Key, body: dict[str, Any], spec: api.FineTuneJobSpec) -> bool | None:
        """The CPU-only prepare Job (spec.prepare.mode separate) that runs before the GPU Job: create
        it, and report it as the status (Pending, reason Preparing while its pod runs; Failed with the
        pod's reason -- InvalidDataset, InvalidSpec, ... -- when it fails: then no GPU Job is ever
        created). -> None once it completed (the GPU Job may be created), else whether the resource
        is blocked (re-checked with backoff). A prepare Job deleted before the GPU Job exists is
        simply made again: preparing is idempotent (content-addressed) and holds no GPU."""
        kind, now = body["kind"], self.clock()
        prep = self.cache.job(key, PREPARE)
        if prep is None:
            try:
                self._create_support(body, spec)
                prep, created = self.kube.create(builders.prepare_job(body, spec, self.settings,
                                                                      self._gpu_memory(spec)))
            except ApiError as err:
                refused = status.create_refused(err.status, str(err))
                if refused is None:
                    raise
                self._write(body, status.derive(kind, body, None, [], now, blocked=refused))
                return refused.phase != "Failed"
            self.cache.put_child({**prep, "kind": "Job"})
            self._children_checked[key] = time.monotonic()
            if created:
                self.emit(body, "Normal", "PrepareJobCreated",
                          f"created Job {prep['metadata']['name']}: the data is prepared on CPU before the GPU Job")
        if not self._owned(prep, body):
            wait = status.Verdict("Pending", "WaitingForCleanup",
                                  f"a Job {prep['metadata']['name']} of an earlier resource with this name still "
                                  "exists; waiting for the garbage collector")
            self._write(body, status.derive(kind, body, None, [], now, blocked=wait))
            return True
        if status.job_condition(prep, "Complete") or status.job_condition(prep, "SuccessCriteriaMet"):
            return None
        pods = self.cache.pods(key, prep["metadata"]["uid"])
        stage = (body.get("status") or {}).get("stage")
        found = status.prepare_verdict(prep, pods, stage if isinstance(stage, str) else None)
        new = status.derive(kind, body, None, [], now, blocked=found)
        timeout = spec.startup_timeout_seconds or self.settings.startup_timeout_seconds
        gave_up, wait_s = status.startup_timeout(new, prep, pods, now, timeout)
        if gave_up is not None:
            new = status.derive(kind, body, None, [], now, blocked=gave_up)
        elif wait_s is not None:
            self.queue.add_after(key, wait_s + 1.0)
        new["prepareJobName"] = prep["metadata"]["name"]
        if status.ready_reason(new) in ("Starting", "Retrying"):
            self._check_children(key, body, spec)
        self._write(body, new, precondition=new["phase"] in status.TERMINAL)
        if new["phase"] in status.TERMINAL:
            self._wind_down(key, body, new)
        return False

    def _wind_down(self, key: Key, body: dict[str, Any], st: dict[str, Any]) -> None:
        """Once the end is in the status: stop a Job that still runs (a startup timeout), and only
        now hand the Jobs (the prepare stage's too) to their TTL (spec.ttlSecondsAfterFinished)."""
        for stage in (TRAIN, PREPARE):
            job = self.cache.job(key, stage)
            if job is not None and self._owned(job, body):
                self._wind_down_job(body, job, st)

    def _wind_down_job(self, body: dict[str, Any], job: dict[str, Any], st: dict[str, Any]) -> None:
        finished = status.job_condition(job, "Complete") or status.job_condition(job, "Failed")
        patch: dict[str, Any] = {}
        if not finished and st.get("phase") == "Failed" and (job.get("spec") or {}).get("activeDeadlineSeconds") != 1:
            patch = {"spec": {"activeDeadlineSeconds": 1}}  # the Job controller fails it and deletes its pods
        spec, _ = validation.parse_spec(body["kind"], body.get("spec") or {})
        ttl = builders.ttl_patch(job, spec) if spec is not None else None
        if ttl:
            patch = {"spec": {**patch.get("spec", {}), **ttl["spec"]}}
        if patch:
            meta = job["metadata"]
            patched = self.kube.patch("Job", meta["namespace"], meta["name"], patch)
            self.cache.put_child({**patched, "kind": "Job"})

    def _lost_job(self, key: Key, body: dict[str, Any], old: dict[str, Any]) -> dict[str, Any] | None:
        """``status.jobName`` is recorded but the cache has no Job: read it (the cache may lag). Gone:
        never create it again -- report JobLost, or keep the result the pod reported."""
        kind, meta = body["kind"], body["metadata"]
        job = self.kube.get("Job", meta["namespace"], old["jobName"])
        if job is not None and self._owned(job, body):
            self.cache.put_child({**job, "kind": "Job"})
            return job
        verdict = status.lost_job_verdict(kind, old)
        log.warning("%s: Job %s is gone before its end was recorded: %s", _name(key), old["jobName"], verdict.reason)
        self._write(body, status.derive(kind, body, None, [], self.clock(), blocked=verdict), precondition=True)
        if kind == "FineTuneJob" and verdict.phase == "Succeeded":
            self._ensure_merge_job(body)
        return None

    def _check(self, body: dict[str, Any], spec: Any) -> tuple[status.Verdict | None, Any]:
        """Validation that needs the API: (blocking verdict, None) or (None, the resolved spec)."""
        blocked = validation.check_resources(spec, self.settings.trainer_image)
        if blocked:
            return blocked, None
        ns = body["metadata"]["namespace"]
        run_spec = spec
        if isinstance(spec, api.MergeJobSpec) and spec.source.fine_tune_job_ref is not None:
            ref = spec.source.fine_tune_job_ref.name
            ftj = self.cache.get(("FineTuneJob", ns, ref)) or self.kube.get("FineTuneJob", ns, ref)
            blocked = validation.check_fine_tune_job(ref, ftj)
            if blocked:
                return blocked, None
            try:
                run_spec = builders.resolve_merge_spec(spec, ftj)
            except ValueError as err:
                return status.Verdict("Failed", "InvalidSpec", f"cannot resolve the MergeJob: {err}",
                                      stalled=True), None
        chained = spec.model.adapter_from if isinstance(spec, api.FineTuneJobSpec) else None
        if chained is not None and chained.fine_tune_job_ref is not None:  # e.g. DPO after SFT: wait for it
            ref = chained.fine_tune_job_ref.name
            ftj = self.cache.get(("FineTuneJob", ns, ref)) or self.kube.get("FineTuneJob", ns, ref)
            blocked = validation.check_fine_tune_job(ref, ftj, "model.adapterFrom.fineTuneJobRef")
            if blocked:
                return blocked, None
            try:
                run_spec = builders.resolve_adapter_from(spec, ftj)
            except ValueError as err:
                return status.Verdict("Failed", "InvalidSpec", str(err), stalled=True), None
        needs = validation.secret_needs(run_spec) if self.settings.check_secrets else []
        secrets = {n.name: self._secret_keys(ns, n.name) for n in needs}
        blocked = validation.check_secrets(needs, secrets)
        if blocked is None:
            account = builders.pod_service_account(body, self.settings)
            if account != builders.support_name(body):  # spec.pod's (workload identity): it must exist
                blocked = validation.check_service_account(account,
                                                           self.kube.get("ServiceAccount", ns, account) is not None)
        return (blocked, None) if blocked else (None, run_spec)

    def _secret_keys(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The Secret's key names (``{"data": {key: ""}}``), None when it does not exist. A Secret seen
        in the last SECRET_TTL seconds is not read again: a burst of jobs sharing one Secret costs one
        GET. Absence is never cached, so a Secret created after its job is noticed at the next check.
        Values are never kept."""
        now = time.monotonic()
        with self._secrets_lock:
            seen = self._secrets.get((namespace, name))
        if seen and now - seen[0] < SECRET_TTL:
            return seen[1]
        secret = self.kube.get("Secret", namespace, name)
        if secret is None:
            return None
        keys = {"data": dict.fromkeys(set(secret.get("data") or {}) | set(secret.get("stringData") or {}), "")}
        with self._secrets_lock:
            self._secrets[(namespace, name)] = (now, keys)
            for stale in [k for k, (t, _) in self._secrets.items() if now - t >= SECRET_TTL]:
                del self._secrets[stale]
        return keys

    def _create_children(self, body: dict[str, Any], spec: Any) -> tuple[dict[str, Any] | None, status.Verdict | None]:
        """The ConfigMap, ServiceAccount, Role and RoleBinding (and a multi-node job's Service), then
        the Job (its pod needs the ServiceAccount). -> (Job, None), or (None, verdict) when the API
        server refused a create (quota, an admission webhook or policy, an invalid field): that shows
        in the status."""
        try:
            self._create_support(body, spec)
            job, created = self.kube.create(builders.job(body, spec, self.settings, builders.initial_suspend(spec),
                                                         self._gpu_memory(spec)))
        except ApiError as err:
            verdict = status.create_refused(err.status, str(err))
            if verdict is None:
                raise
            return None, verdict
        self.cache.put_child({**job, "kind": "Job"})
        if created:
            self.emit(body, "Normal", "JobCreated", f"created Job {job['metadata']['name']}")
        return job, None

    def _gpu_memory(self, spec: Any) -> tuple[int, str] | None:
        """builders.gpu_memory over the nodes with a GPU memory label (listed at most every
        NODES_SECONDS). Reading nodes needs the chart's optional ClusterRole (readNodes); without
        it the trainer's check uses resources.gpuMemory or the GPU itself."""
        if not isinstance(spec, api.FineTuneJobSpec) or spec.resources.gpus == 0 or spec.resources.gpu_memory:
            return None
        when, nodes = self._nodes
        if time.monotonic() - when > NODES_SECONDS:
            try:
                nodes = self.kube.list("Node", "", contract.GPU_MEMORY_LABEL)
            except ApiError as err:
                if err.status not in (401, 403):
                    raise
                if when < 0:
                    log.info("cannot list nodes (%s): the GPU memory check uses resources.gpuMemory", err.status)
                nodes = None
            self._nodes = (time.monotonic(), nodes)
        return builders.gpu_memory(spec, nodes or [])

    def _create_support(self, body: dict[str, Any], spec: Any | None) -> list[str]:
        """Create the four support objects at once (they are independent), and the headless Service
        of a multi-node FineTuneJob; a 409 means it exists, and their uid-derived names make it ours.
        -> those that had to be created ("<kind> <name>")."""
        children = [builders.service_account(body), builders.role(body)]
        if spec is not None:
            children.insert(0, builders.config_map(body, spec))
        if builders.needs_service(spec):
            children.append(builders.rendezvous_service(body))
        futures = [self._children_pool.submit(self.kube.create, child, read_existing=False) for child in children]
        created = [child for child, future in zip(children, futures, strict=True) if future.result()[1]]
        # the RoleBinding after its Role: the API server resolves the Role to check for escalation (404 if absent)
        binding = builders.role_binding(body, self.settings)
        if self.kube.create(binding, read_existing=False)[1]:
            created.append(binding)
        return [f"{child['kind']} {child['metadata']['name']}" for child in created]

    def _check_children(self, key: Key, body: dict[str, Any], spec: Any) -> None:
        """The Job exists but has no pod: re-create a missing support object (deleted by hand, or by the
        garbage collector of a namesake's era), at most every CHILD_CHECK_SECONDS, and say so."""
        now = time.monotonic()
        if now - self._children_checked.get(key, -1e9) < CHILD_CHECK_SECONDS:
            return
        self._children_checked[key] = now
        run_spec = spec
        if isinstance(spec, api.MergeJobSpec) and spec.source.fine_tune_job_ref is not None:
            ftj = self.cache.get(("FineTuneJob", key[1], spec.source.fine_tune_job_ref.name))
            try:
                run_spec = builders.resolve_merge_spec(spec, ftj)
            except (ValueError, KeyError):
                run_spec = None  # cannot rebuild the ConfigMap now: the other three are still checked
        chained = spec.model.adapter_from if isinstance(spec, api.FineTuneJobSpec) else None
        if chained is not None and chained.fine_tune_job_ref is not None:
            ftj = self.cache.get(("FineTuneJob", key[1], chained.fine_tune_job_ref.name))
            try:
                run_spec = builders.resolve_adapter_from(spec, ftj)
            except (ValueError, KeyError):
                run_spec = None
        try:
            repaired = self._create_support(body, run_spec)
        except ApiError as err:
            log.warning("%s: cannot check its support objects: %s", _name(key), err)
            return
        if repaired:
            self.emit(body, "Warning", "ChildRecreated", f"re-created the missing {', '.join(repaired)}")

    def _workload_state(self, key: Key, job: dict[str, Any]) -> tuple[str, str] | None:
        """The Workload's state for a queued Job that waits (:func:`kueue.workload_state`), read at
        most every WORKLOAD_READ_SECONDS per Job (the operator does not watch Workloads: one LIST
        each time), and looked at again after that while the job waits."""
        uid, now = job["metadata"]["uid"], time.monotonic()
        with self._workloads_lock:
            seen = self._workloads_read.get(uid)
        if seen is not None and now - seen[0] < WORKLOAD_READ_SECONDS:
            return seen[1]  # type: ignore[no-any-return]
        try:
            workloads = self.kube.list("Workload", job["metadata"]["namespace"], kueue.workload_selector(job))
            state = kueue.workload_state(kueue.workload_for_job(workloads, job))
        except ApiError as err:
            if err.status not in (403, 404):  # no Kueue, or no RBAC for Workloads: nothing more to say
                raise
            state = None
        with self._workloads_lock:
            self._workloads_read[uid] = (now, state)
            while len(self._workloads_read) > kueue.MEMO_SIZE:
                self._workloads_read.pop(next(iter(self._workloads_read)))
        self.queue.add_after(key, WORKLOAD_READ_SECONDS + 1.0)
        return state

    @staticmethod
    def _owned(job: dict[str, Any], body: dict[str, Any]) -> bool:
        uid = body["metadata"]["uid"]
        return any(ref.get("uid") == uid for ref in job["metadata"].get("ownerReferences") or [])

    def _align_suspend(self, job: dict[str, Any], want: bool, queued: bool, key: Key) -> dict[str, Any]:
        """spec.suspend -> Job.spec.suspend. A Kueue-queued Job is Kueue's to suspend and resume (it
        un-suspends the Job of an admitted Workload): there spec.suspend goes to the Workload's
        spec.active instead (kubetune_operator.kueue), and the Job is never patched."""
        aligned = self._kueue_aligned
        if status.job_condition(job, "Complete") or status.job_condition(job, "Failed"):
            aligned.forget(job["metadata"]["uid"])
            return job
        if queued:
            again = kueue.align(self.kube, job, want, aligned)
            if again is not None:  # suspend wanted, but Kueue has not created the Workload yet
                self.queue.add_after(key, again)
            return job
        if want == bool(job["spec"].get("suspend")):
            return job
        meta = job["metadata"]
        patched = self.kube.patch("Job", meta["namespace"], meta["name"], {"spec": {"suspend": want}})
        self.cache.put_child({**patched, "kind": "Job"})
        return patched

    def _write(self, body: dict[str, Any], new: dict[str, Any], precondition: bool = False) -> None:
        """Merge-patch the changed status keys. ``precondition``: only onto the version the cache
        holds (HTTP 409 if someone wrote since: the reconcile is retried on fresher data), for the
        writes that must not land on a status the operator has not seen (the terminal ones)."""
        kind, meta = body["kind"], body["metadata"]
        old = body.get("status") or {}
        ready = next((c for c in new.get("conditions") or [] if c.get("type") == "Ready"), {})
        metrics.observe(f"{kind}/{meta['namespace']}/{meta['name']}", kind, new["phase"], ready.get("reason"),
                        _epoch(ready.get("lastTransitionTime")))
        patch = status.changed(old, new)
        if not patch:
            return
        doc: dict[str, Any] = {"status": patch}
        if precondition and meta.get("resourceVersion"):
            doc["metadata"] = {"resourceVersion": meta["resourceVersion"]}
        try:
            written = self.kube.patch(kind, meta["namespace"], meta["name"], doc, subresource="status")
        except ApiError as err:
            if err.status == 404:
                raise Gone(_name(key_of(body))) from err
            raise
        self.cache.update({**written, "kind": kind})
        body["status"] = {**old, **patch}
        if new["phase"] in status.TERMINAL and old.get("phase") not in status.TERMINAL:
            metrics.completed(kind, new["phase"], ready.get("reason") or new["phase"])
        event = transition_event(old, new)
        if event:
            self.emit(body, *event)

    def _ensure_merge_job(self, body: dict[str, Any]) -> None:
        spec = api.FineTuneJobSpec.model_validate(body["spec"])
        if spec.merge is None or not spec.merge.enabled:
            return
        meta = body["metadata"]
        if (body.get("status") or {}).get("mergeJobName"):
            return
        mj, created = self.kube.create(builders.merge_job(body, spec))
        if not self._owned(mj, body):  # a namesake's, not yet collected: wait for the garbage collector
            raise ApiError(409, "POST", Kube.path("MergeJob", meta["namespace"]),
                           f"MergeJob {mj['metadata']['name']} belongs to an earlier FineTuneJob with this name")
        if created:
            self.emit(body, "Normal", "MergeJobCreated", f"created MergeJob {mj['metadata']['name']}")
        written = self.kube.patch("FineTuneJob", meta["namespace"], meta["name"],
                                  {"status": {"mergeJobName": mj["metadata"]["name"]}}, subresource="status")
        self.cache.update({**written, "kind": "FineTuneJob"})


class Gone(Exception):
    """The resource no longer exists (HTTP 404 on its status)."""


def transition_event(old: dict[str, Any], new: dict[str, Any]) -> tuple[str, str, str] | None:
    """The Event (type, reason, message) a status change is worth, or None: a phase change (not into
    Pending), a failure or stall, or a reason in NOTABLE_REASONS."""
    reason = _ready_reason(new)
    if (old.get("phase"), _ready_reason(old)) == (new["phase"], reason):
        return None
    failing = new["phase"] == "Failed" or any(c["type"] == "Stalled" for c in new.get("conditions") or [])
    if not (failing or reason in NOTABLE_REASONS or old.get("phase") != new["phase"] != "Pending"):
        return None
    type_ = "Warning" if failing or reason in NOTABLE_REASONS else "Normal"
    return type_, reason, f"{new['phase']}: {new['message']}"


def _epoch(rfc3339: str | None) -> float | None:
    if not rfc3339:
        return None
    try:
        return dt.datetime.strptime(rfc3339, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp()
    except ValueError:
        return None


def _ready_reason(st: dict[str, Any]) -> str:
    return status.ready_reason(st)
