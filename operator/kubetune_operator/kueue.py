"""``spec.suspend`` of a Kueue-queued resource: through its Workload's ``spec.active``.

A Job with the ``kueue.x-k8s.io/queue-name`` label is Kueue's to suspend and resume: its job
reconciler un-suspends the Job of every admitted Workload, so patching ``Job.spec.suspend`` would
start a fight in which each round SIGTERMs the trainer. Kueue's supported stop is the Workload's
``spec.active: false``: Kueue evicts the Workload (condition ``Evicted``, reason
``Deactivated``), suspends the Job itself (the trainer checkpoints on SIGTERM as with a plain
suspend) and releases its quota; ``spec.active: true`` queues it again.

The operator marks the Workloads it deactivates with :data:`ANNOTATION_DEACTIVATED` and re-activates
only those: a Workload that Kueue (or an admin) deactivated for its own reasons, e.g. the
``waitForPodsReady`` requeuing limit, stays inactive.

Which Workload belongs to a Job: Kueue labels it ``kueue.x-k8s.io/job-uid=<job uid>`` and makes the
Job its controller owner. The operator does not watch Workloads; :class:`Aligned` remembers per Job
what has already been brought in line, so a reconcile that has nothing to change makes no API call.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any

from kubetune_operator.kube import ApiError

log = logging.getLogger("kubetune.operator")

LABEL_JOB_UID = "kueue.x-k8s.io/job-uid"
ANNOTATION_DEACTIVATED = "kubetune.dev/deactivated-by"
DEACTIVATED_BY = "spec.suspend"
MEMO_SIZE = 10_000  # Jobs remembered (a bool each); the oldest are forgotten, which costs a LIST


def workload_selector(job: dict[str, Any]) -> str:
    """The label selector of the Job's Workload(s)."""
    return f"{LABEL_JOB_UID}={job['metadata']['uid']}"


def workload_for_job(workloads: list[dict[str, Any]], job: dict[str, Any]) -> dict[str, Any] | None:
    """The Workload the Job owns (controller ownerReference to the Job's uid), not being deleted;
    the newest when there are several (Kueue replaces a Workload that no longer matches its Job)."""
    uid = job["metadata"]["uid"]
    owned = [w for w in workloads if not w["metadata"].get("deletionTimestamp")
             and any(ref.get("uid") == uid and ref.get("controller")
                     for ref in w["metadata"].get("ownerReferences") or [])]
    owned.sort(key=lambda w: (w["metadata"].get("creationTimestamp") or "", w["metadata"].get("name") or ""))
    return owned[-1] if owned else None


def is_active(workload: dict[str, Any]) -> bool:
    """``spec.active`` (defaults to true)."""
    return (workload.get("spec") or {}).get("active", True) is not False


def deactivated_by_us(workload: dict[str, Any]) -> bool:
    return (workload["metadata"].get("annotations") or {}).get(ANNOTATION_DEACTIVATED) == DEACTIVATED_BY


def active_patch(workload: dict[str, Any], suspend: bool) -> dict[str, Any] | None:
    """The merge patch that makes the Workload follow ``spec.suspend``, or None when nothing is to
    change: suspend -> ``active: false`` (marked as ours); resume -> ``active: true`` only for a
    Workload that the operator deactivated."""
    if suspend:
        if not is_active(workload):
            return None
        return {"metadata": {"annotations": {ANNOTATION_DEACTIVATED: DEACTIVATED_BY}}, "spec": {"active": False}}
    if is_active(workload) or not deactivated_by_us(workload):
        return None
    return {"metadata": {"annotations": {ANNOTATION_DEACTIVATED: None}}, "spec": {"active": True}}


def needs_check(job: dict[str, Any], suspend: bool, aligned: bool | None) -> bool:
    """Whether the Workload must be read. ``aligned`` is the ``suspend`` value the Workload was
    last brought in line with (None: not known, e.g. after a restart).

    * resume, the Job runs: its Workload is admitted, so active: nothing to do;
    * resume, the Job is suspended (waiting for admission, or deactivated): known aligned -> nothing;
    * suspend: known aligned and the Job is suspended -> nothing. A running Job means an active
      Workload (e.g. Kueue re-created it): check again.
    """
    job_suspended = bool((job.get("spec") or {}).get("suspend"))
    if not suspend:
        return job_suspended and aligned is not False
    return not (aligned is True and job_suspended)


class Aligned:
    """Per Job uid: the ``spec.suspend`` value its Workload was last seen or made to follow
    (thread-safe, bounded)."""

    def __init__(self, size: int = MEMO_SIZE) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._seen: OrderedDict[str, bool] = OrderedDict()
        self._misses: dict[str, int] = {}

    def get(self, uid: str) -> bool | None:
        with self._lock:
            return self._seen.get(uid)

    def set(self, uid: str, suspend: bool) -> None:
        with self._lock:
            self._misses.pop(uid, None)
            self._seen[uid] = suspend
            self._seen.move_to_end(uid)
            while len(self._seen) > self._size:
                self._seen.popitem(last=False)

    def miss(self, uid: str) -> int:
        """The Workload was not there (Kueue has not made it yet): how many times in a row."""
        with self._lock:
            self._misses[uid] = n = self._misses.get(uid, 0) + 1
            if len(self._misses) > self._size:
                self._misses.pop(next(iter(self._misses)))
            return n

    def forget(self, uid: str) -> None:
        with self._lock:
            self._seen.pop(uid, None)
            self._misses.pop(uid, None)


def recheck_delay(misses: int) -> float:
    """When to look for a not-yet-created Workload again: 1 s, 2 s, 4 s ... up to 5 min (without
    Kueue running, a queued Job's Workload never comes)."""
    return float(min(300, 2 ** max(0, misses - 1)))


def align(kube: Any, job: dict[str, Any], suspend: bool, memo: Aligned) -> float | None:
    """Make the Job's Workload follow ``spec.suspend`` (at most one LIST and one PATCH; none when
    :func:`needs_check` says so). Returns a delay after which to look again when the Workload does
    not exist yet and a suspend is wanted, else None. Never touches the Job."""
    uid = job["metadata"]["uid"]
    if not needs_check(job, suspend, memo.get(uid)):
        return None
    ns = job["metadata"]["namespace"]
    try:
        workload = workload_for_job(kube.list("Workload", ns, workload_selector(job)), job)
    except ApiError as err:
        if err.status not in (403, 404):
            raise
        # 404: Kueue is not installed (nothing admits the Job then); 403: a ClusterRole without
        # `workloads`. Neither may stop the status from being written: treat as "no Workload yet".
        log.warning("cannot list the Workloads of Job %s/%s: %s", ns, job["metadata"]["name"], err)
        workload = None
    if workload is None:
        if not suspend:  # a Workload Kueue creates later is active
            memo.set(uid, suspend)
            return None
        return recheck_delay(memo.miss(uid))
    patch = active_patch(workload, suspend)
    if patch is not None:
        kube.patch("Workload", ns, workload["metadata"]["name"], patch)
    memo.set(uid, suspend)
    return None


def workload_state(workload: dict[str, Any] | None) -> tuple[str, str] | None:
    """Why a queued job's Job is suspended, in Kueue's words, as (reason, message) for the status:
    ``Preempted`` (evicted for a higher-priority workload), ``Evicted`` (evicted for another reason:
    pods not ready in time, an admission check, a stopped ClusterQueue; both resume from the last
    checkpoint once admitted again) or ``WaitingForAdmission`` (Kueue's message: which quota is
    short, in which ClusterQueue). None when the Workload says nothing more (not created yet, or
    deactivated, e.g. by spec.suspend)."""
    if workload is None:
        return None
    conds = {c.get("type"): c for c in (workload.get("status") or {}).get("conditions") or []}
    evicted, reserved = conds.get("Evicted") or {}, conds.get("QuotaReserved") or {}
    if evicted.get("status") == "True" and reserved.get("status") != "True" \
            and evicted.get("reason") not in ("Deactivated", "InactiveWorkload"):
        preempted = evicted.get("reason") == "Preempted"
        what = "preempted" if preempted else f"evicted ({evicted.get('reason')})"
        return ("Preempted" if preempted else "Evicted"), (
            f"{what} by Kueue ({evicted.get('message') or 'no message'}); it resumes from its last checkpoint "
            "once admitted again")
    if reserved.get("status") == "False" and reserved.get("message"):
        return "WaitingForAdmission", f"waiting for admission by Kueue: {reserved['message']}"
    return None
