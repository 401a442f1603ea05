"""Pure status derivation: observed Job + pods (+ the trainer's termination message) -> status.

Level-based: the status is a function of what exists now, never of the events seen on the way,
so a restarted operator computes the same status. The operator owns ``phase``, ``conditions``,
``message``, ``observedGeneration``, ``jobName``, ``attempts``, ``startTime`` and
``completionTime``; the pod's own patches (``stage``, ``progress``, ``checkpointUri``, ...) are
left alone, except that the result fields of the termination message are copied when a pod ends
(so results arrive even without the progress channel). While the pod runs, its ``stage`` is
appended to the operator's ``message``, so one line says both which attempt runs and what it does.

Conditions follow kstatus: ``Ready`` is always present (True once succeeded); ``Reconciling`` is
True while work is in progress, ``Stalled`` is True when it failed or cannot progress without
help; ``Succeeded``/``Failed``/``Suspended`` are added when they hold. All carry
``observedGeneration``.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass
from typing import Any

from kubetune import contract

MESSAGE_LIMIT = 4096
RESULT_FIELDS = {
    "FineTuneJob": ("adapterUri", "checkpointUri", "reportUri", "wandbUrl", "progress"),
    "MergeJob": ("mergedUri", "adapterUri", "verification", "samples"),
}
OWNED_FIELDS = ("phase", "conditions", "message", "observedGeneration", "jobName", "attempts", "startTime",
                "completionTime", "model", "prepareJobName")
# Container waiting reasons that need a human (wrong image, missing Secret key): Stalled.
STALLED_WAITING = {"ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError", "ErrImageNeverPull"}
# Waiting reasons worth surfacing while the pod starts.
REPORTED_WAITING = STALLED_WAITING | {"ErrImagePull", "CreateContainerError", "ContainerCreating"}
# A pod that stays in one of these (or is never created) past the startup timeout fails the job.
# Not ContainerCreating: a slow pull of a large image is progress, not a fault.
STUCK = STALLED_WAITING | {"ErrImagePull", "CreateContainerError", "Unschedulable", "Starting"}
TERMINAL = ("Succeeded", "Failed")
RESULT_KEY = {"FineTuneJob": "adapterUri", "MergeJob": "mergedUri"}
_REASON_RE = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")


@dataclass(frozen=True)
class Verdict:
    """What the observed state means: phase + the reason and message for the conditions."""

    phase: str
    reason: str
    message: str
    stalled: bool = False


@dataclass(frozen=True)
class Termination:
    """A container's end: exit code, kubelet reason and the parsed termination message."""

    exit_code: int | None
    kubelet_reason: str | None
    reason: str | None
    message: str
    result: dict[str, Any]


# ----------------------------------------------------------------------------------------------
# small readers of Kubernetes objects
# ----------------------------------------------------------------------------------------------


def safe_reason(reason: str | None, default: str) -> str:
    """A metav1.Condition reason (CamelCase identifier) or ``default``."""
    return reason if reason and _REASON_RE.match(reason) and len(reason) <= 1024 else default


def truncate(text: str, limit: int = MESSAGE_LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def job_condition(job: dict[str, Any] | None, ctype: str) -> dict[str, Any] | None:
    """The Job condition of that type when it is True."""
    for cond in ((job or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == ctype and cond.get("status") == "True":
            return cond
    return None


def parse_termination_message(text: str | None) -> tuple[str | None, str, dict[str, Any]]:
    """(reason, message, result) from the trainer's JSON termination message; a non-JSON text
    (the log tail, with FallbackToLogsOnError) becomes the message."""
    if not text:
        return None, "", {}
    try:
        doc = json.loads(text)
    except ValueError:
        return None, truncate(text.strip()), {}
    if not isinstance(doc, dict):
        return None, truncate(text.strip()), {}
    result = doc.get("result")
    return (doc.get("reason") if isinstance(doc.get("reason"), str) else None,
            truncate(str(doc.get("message") or "")), result if isinstance(result, dict) else {})


def _main_status(pod: dict[str, Any]) -> dict[str, Any]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return statuses[0] if statuses else {}


def termination(pod: dict[str, Any]) -> Termination | None:
    """How the pod's (single) container ended, or None while it has not."""
    cs = _main_status(pod)
    term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
    if not term:
        status = pod.get("status") or {}
        if status.get("phase") == "Failed" and status.get("reason"):  # evicted, deadline, ...
            return Termination(None, status["reason"], None, truncate(status.get("message") or ""), {})
        return None
    reason, message, result = parse_termination_message(term.get("message"))
    return Termination(term.get("exitCode"), term.get("reason"), reason, message, result)


def waiting_reason(pod: dict[str, Any]) -> tuple[str | None, str]:
    waiting = (_main_status(pod).get("state") or {}).get("waiting") or {}
    return waiting.get("reason"), waiting.get("message") or ""


def unschedulable(pod: dict[str, Any]) -> str | None:
    """The scheduler's message when the pod cannot be placed (PodScheduled=False/Unschedulable)."""
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False" \
                and cond.get("reason") == "Unschedulable":
            return cond.get("message") or "no node fits the pod"
    return None


def _created(obj: dict[str, Any]) -> str:
    return (obj.get("metadata") or {}).get("creationTimestamp") or ""


def by_age(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Oldest first (creationTimestamp, then name for ties)."""
    return sorted(pods, key=lambda p: (_created(p), p["metadata"].get("name", "")))


def completion_index(pod: dict[str, Any]) -> str | None:
    """The pod's index in an Indexed Job (a multi-node FineTuneJob's), None in a one-pod Job."""
    meta = pod.get("metadata") or {}
    return ((meta.get("annotations") or {}).get(contract.COMPLETION_INDEX_ANNOTATION)
            or (meta.get("labels") or {}).get(contract.COMPLETION_INDEX_ANNOTATION))


def attempt_failure(term: Termination) -> tuple[str, str]:
    """(reason, message) for one failed attempt."""
    if term.kubelet_reason == "OOMKilled":
        return "OOMKilled", ("the container ran out of memory (OOMKilled); raise spec.resources.memory or "
                             "lower training.batchSize / training.maxLength")
    if term.exit_code in contract.EXIT_REASONS:
        reason = contract.EXIT_REASONS[term.exit_code]  # type: ignore[index]
        return reason, term.message or f"exit code {term.exit_code} ({reason})"
    if term.exit_code is None:
        return safe_reason(term.kubelet_reason, "PodFailed"), term.message or "the pod failed"
    detail = f": {term.message}" if term.message else ""
    return "Error", f"exit code {term.exit_code}{detail}"


# ----------------------------------------------------------------------------------------------
# the verdict
# ----------------------------------------------------------------------------------------------


def deciding_failure(failed_pods: list[dict[str, Any]]) -> Termination | None:
    """How the failed Job's deciding pod ended (``failed_pods`` oldest first): the newest one with a
    permanent exit code (what the pod failure policy fails the Job on: a multi-node job's other pods
    are stopped then and fail after it), else the newest."""
    permanent = [p for p in failed_pods
                 if getattr(termination(p), "exit_code", None) in contract.PERMANENT_EXIT_CODES]
    return termination((permanent or failed_pods)[-1]) if failed_pods else None


def _failed(job: dict[str, Any], cond: dict[str, Any], failed_pods: list[dict[str, Any]]) -> Verdict:
    job_reason = cond.get("reason") or "Failed"
    job_message = cond.get("message") or "the Job failed"
    last = deciding_failure(failed_pods)
    pod_reason, pod_message = attempt_failure(last) if last else (None, "")
    pods_or_attempts = "failed pods" if int((job.get("spec") or {}).get("parallelism") or 1) > 1 else "failed attempts"
    if job_reason == "DeadlineExceeded":
        return Verdict("Failed", "DeadlineExceeded",
                       f"{job_message} (spec.activeDeadlineSeconds={job['spec'].get('activeDeadlineSeconds')})",
                       stalled=True)
    if job_reason == "PodFailurePolicy" and pod_reason:
        return Verdict("Failed", pod_reason, pod_message, stalled=True)
    if job_reason == "BackoffLimitExceeded" and pod_reason in ("OOMKilled", "StorageError"):
        return Verdict("Failed", pod_reason, f"{pod_message} (backoff limit exceeded after "
                                             f"{len(failed_pods)} {pods_or_attempts})", stalled=True)
    detail = f"; last attempt: {pod_message}" if pod_message else ""
    return Verdict("Failed", safe_reason(job_reason, "Failed"), truncate(job_message + detail), stalled=True)


def _active(job: dict[str, Any], pods: list[dict[str, Any]], attempts: int, stage: str | None) -> Verdict:
    live = [p for p in pods if (p.get("status") or {}).get("phase") in ("Pending", "Running", None)
            and not p["metadata"].get("deletionTimestamp")]
    failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
    succeeded = [p for p in pods if (p.get("status") or {}).get("phase") == "Succeeded"]
    if not live:
        if succeeded:  # the Job controller has not marked the Job Complete yet
            name = succeeded[-1]["metadata"].get("name", "")
            return Verdict("Running", "Completing", f"pod {name} succeeded; waiting for the Job to complete")
        if failed:
            last = termination(failed[-1])
            _, message = attempt_failure(last) if last else (None, "the pod failed")
            return Verdict("Running", "Retrying", truncate(f"attempt {len(failed)} failed ({message}); retrying"))
        return Verdict("Pending", "Starting", "waiting for the pod to be created")
    pod = live[-1]
    name = pod["metadata"].get("name", "")
    if pod["status"].get("phase") == "Running":
        doing = f": {stage}" if stage else ""
        return Verdict("Running", "Running", truncate(f"pod {name} is running (attempt {attempts}){doing}"))
    scheduler_message = unschedulable(pod)
    if scheduler_message:
        return Verdict("Pending", "Unschedulable", truncate(f"pod {name} cannot be scheduled: {scheduler_message}"))
    reason, message = waiting_reason(pod)
    if reason in REPORTED_WAITING:
        text = f"pod {name}: {reason}" + (f": {message}" if message else "")
        return Verdict("Pending", reason, truncate(text), stalled=reason in STALLED_WAITING)  # type: ignore[arg-type]
    return Verdict("Pending", "PodPending", f"pod {name} is starting")


def verdict(job: dict[str, Any] | None, pods: list[dict[str, Any]], spec_suspend: bool = False,
            stage: str | None = None) -> Verdict:
    """Phase, reason and message of the observed Job and its pods (oldest pod first); ``stage`` is what
    the pod last reported doing (``status.stage``), shown while it runs."""
    if job is None:
        return Verdict("Pending", "Creating", "creating the Job")
    pods = by_age(pods)
    failed_pods = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
    done = job_condition(job, "Complete") or job_condition(job, "SuccessCriteriaMet")
    if done:
        term = result_termination([p for p in pods if (p.get("status") or {}).get("phase") == "Succeeded"])
        return Verdict("Succeeded", "Succeeded", (term.message if term and term.message else "the Job completed"))
    failed = job_condition(job, "Failed") or job_condition(job, "FailureTarget")
    if failed:
        return _failed(job, failed, failed_pods)
    if (job.get("spec") or {}).get("suspend"):
        running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
        if running:  # SIGTERM'd, saving its checkpoint: Suspended only once it is gone, so that the
            # status read at Suspended names the checkpoint a resume starts from
            name = running[-1]["metadata"].get("name", "")
            return Verdict("Running", "Suspending", f"pod {name} is saving a checkpoint and stopping")
        if spec_suspend:
            return Verdict("Suspended", "Suspended", "suspended (spec.suspend); unsuspend to resume from the "
                                                     "latest checkpoint")
        return Verdict("Pending", "WaitingForAdmission", "the Job is suspended until it is admitted "
                                                         "(Kueue queue) or resumed")
    return _active(job, pods, attempts(job, pods), stage)


def prepare_verdict(job: dict[str, Any], pods: list[dict[str, Any]], stage: str | None = None) -> Verdict:
    """The status while the CPU prepare Job runs (its GPU Job does not exist yet): Pending, reason
    Preparing while its pod runs or retries; the pod's own waiting reasons (Unschedulable,
    ImagePullBackOff, ...) as they are, for the startup timeout; Failed with the failed pod's reason
    (InvalidDataset, InvalidSpec, ...) and the note that no GPU was asked for."""
    v = verdict(job, pods, False, stage)
    if v.phase == "Failed":
        return Verdict("Failed", v.reason, truncate(f"the prepare stage failed, no GPU pod was created: {v.message}"),
                       stalled=True)
    if v.reason in ("Running", "Retrying", "Completing"):
        return Verdict("Pending", "Preparing", truncate(f"preparing the data on CPU before the GPU Job: {v.message}"))
    return Verdict("Pending", v.reason, truncate(f"prepare stage: {v.message}"), stalled=v.stalled)


def attempts(job: dict[str, Any] | None, pods: list[dict[str, Any]]) -> int:
    """Attempts so far, retries included: pods started (pods may have been deleted: the Job counts
    them too), per pod of the group (a multi-node job's Indexed Job starts ``parallelism`` at once)."""
    st = (job or {}).get("status") or {}
    counted = int(st.get("succeeded") or 0) + int(st.get("failed") or 0) + int(st.get("active") or 0)
    group = max(int(((job or {}).get("spec") or {}).get("parallelism") or 1), 1)
    return -(-max(len(pods), counted) // group)


def result_termination(ended: list[dict[str, Any]]) -> Termination | None:
    """The termination of the newest pod whose message carries a result, else of the newest pod;
    pod 0's first (``ended`` oldest first): of a multi-node job's pods, the one with completion
    index 0 runs global rank 0, the rank that reports the result."""
    first = [p for p in ended if completion_index(p) in (None, "0")]
    ended = [p for p in ended if completion_index(p) not in (None, "0")] + first
    terms = [t for t in (termination(p) for p in ended) if t is not None]
    with_result = [t for t in terms if t.result]
    return (with_result or terms or [None])[-1]


def results(kind: str, job: dict[str, Any] | None, pods: list[dict[str, Any]]) -> dict[str, Any]:
    """Result fields from the termination message of the pod that ended the run (the succeeded one,
    else the latest failed one; of several, the one with a result); only the fields the kind's
    status has."""
    if job is None:
        return {}
    pods = by_age(pods)
    ended = [p for p in pods if (p.get("status") or {}).get("phase") == "Succeeded"] or \
        [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
    term = result_termination(ended)
    if term is None:
        return {}
    return {k: v for k, v in term.result.items() if k in RESULT_FIELDS[kind] and v is not None}


# ----------------------------------------------------------------------------------------------
# conditions and the status document
# ----------------------------------------------------------------------------------------------


def conditions(v: Verdict, generation: int, old: list[dict[str, Any]] | None, now: str) -> list[dict[str, Any]]:
    """kstatus-style conditions; lastTransitionTime kept from ``old`` when the status is unchanged."""
    wanted: list[tuple[str, str]] = [("Ready", "True" if v.phase == "Succeeded" else "False")]
    if v.stalled or v.phase == "Failed":
        wanted.append(("Stalled", "True"))
    elif v.phase in ("Pending", "Running"):
        wanted.append(("Reconciling", "True"))
    if v.phase in ("Succeeded", "Failed", "Suspended"):
        wanted.append((v.phase, "True"))
    previous = {c.get("type"): c for c in old or []}
    out = []
    for ctype, status in wanted:
        prev = previous.get(ctype)
        since = prev["lastTransitionTime"] if prev and prev.get("status") == status and \
            prev.get("lastTransitionTime") else now
        out.append({"type": ctype, "status": status, "observedGeneration": generation,
                    "lastTransitionTime": since, "reason": v.reason, "message": v.message})
    return out


def derive(kind: str, body: dict[str, Any], job: dict[str, Any] | None, pods: list[dict[str, Any]], now: str,
           blocked: Verdict | None = None, spec_suspend: bool = False) -> dict[str, Any]:
    """The status the operator writes (its own fields + results from the termination message).

    ``blocked`` overrides the verdict when the operator did not (or cannot yet) create the Job:
    a validation failure or a MergeJob waiting for its FineTuneJob.
    """
    old = body.get("status") or {}
    generation = int((body.get("metadata") or {}).get("generation") or 1)
    stage = old.get("stage") if isinstance(old.get("stage"), str) else None
    v = blocked or verdict(job, pods, spec_suspend, stage)
    status: dict[str, Any] = {
        "phase": v.phase,
        "conditions": conditions(v, generation, old.get("conditions"), now),
        "message": v.message,
        "observedGeneration": generation,
    }
    model = ((body.get("spec") or {}).get("model") or {}) if kind == "FineTuneJob" else {}
    if model.get("name") or model.get("uri"):
        status["model"] = model.get("name") or model.get("uri")  # the printer column, name or uri
    if job is not None:
        jst = job.get("status") or {}
        status["jobName"] = job["metadata"]["name"]
        status["attempts"] = attempts(job, pods)
        if jst.get("startTime"):
            status["startTime"] = jst["startTime"]
        if v.phase in ("Succeeded", "Failed") and not blocked:
            end = jst.get("completionTime") or next(
                (c.get("lastTransitionTime") for c in jst.get("conditions") or []
                 if c.get("type") in ("Failed", "FailureTarget", "Complete", "SuccessCriteriaMet")
                 and c.get("status") == "True"), None)
            if end:
                status["completionTime"] = end
        status.update(results(kind, job, pods))
    return status


def changed(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """The merge patch for ``new`` over ``old``: only the keys whose value differs (empty: no write)."""
    old = old or {}
    return {k: v for k, v in new.items() if old.get(k) != v}


def observe_generation(old: dict[str, Any], generation: int) -> dict[str, Any]:
    """A finished job's status, acknowledged for a newer generation (e.g. spec.suspend toggled after
    the end): same verdict, ``observedGeneration`` bumped so GitOps tools see it as current."""
    conds = [{**c, "observedGeneration": generation} for c in old.get("conditions") or []]
    return {"phase": old["phase"], "conditions": conds, "message": old.get("message", ""),
            "observedGeneration": generation}


def is_finished(status: dict[str, Any] | None) -> bool:
    """Terminal: Succeeded or Failed. ``Failed`` is only ever written for what cannot change by
    waiting (the CRD also refuses to move a terminal phase); what may resolve itself -- a missing
    Secret or FineTuneJob, a create refused by quota -- is Pending with a Stalled condition."""
    return (status or {}).get("phase") in TERMINAL


def ready_reason(st: dict[str, Any]) -> str:
    """The reason of the status's Ready condition ("" when none)."""
    return next((c.get("reason", "") for c in st.get("conditions") or [] if c.get("type") == "Ready"), "")


def _time(text: str | None) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None
    except ValueError:
        return None


def startup_timeout(new: dict[str, Any], job: dict[str, Any] | None, pods: list[dict[str, Any]], now: str,
                    timeout: int) -> tuple[Verdict | None, float | None]:
    """Has the job waited too long for a running pod? -> (Failed verdict, None) once it has been
    stuck ``timeout`` seconds (ImagePullBackOff, CreateContainerConfigError, Unschedulable, ... or
    no pod at all since the Job started), (None, seconds left) while it is stuck but not yet that
    long, (None, None) when it is not stuck."""
    reason = ready_reason(new)
    if new.get("phase") != "Pending" or reason not in STUCK or job is None:
        return None, None
    if reason == "Starting":  # no pod: the Job controller could not create one (quota, admission, ...)
        since = _time((job.get("status") or {}).get("startTime"))
    else:
        live = [p for p in pods if (p.get("status") or {}).get("phase") in ("Pending", None)]
        since = max((t for t in (_time(_created(p)) for p in live) if t), default=None)
    current = _time(now)
    if since is None or current is None:
        return None, None
    waited = (current - since).total_seconds()
    if waited < timeout:
        return None, timeout - waited
    what = reason if reason != "Starting" else "PodNotCreated"
    detail = new.get("message") or reason
    if reason == "Starting":
        detail = "the Job created no pod (see `kubectl describe job` for quota, PodSecurity or admission errors)"
    return Verdict("Failed", what, truncate(
        f"{detail}; gave up after {timeout}s without a running pod (spec.startupTimeoutSeconds) and stopped "
        "the Job, so its GPU and queue quota are free"), stalled=True), None


def lost_job_verdict(kind: str, old: dict[str, Any]) -> Verdict:
    """The Job recorded in ``status.jobName`` is gone before its end was recorded (TTL while the
    operator was down, a manual delete). Never run the work twice: keep the result the pod reported
    (``stage: done`` and its result URI), else fail with JobLost."""
    result = old.get(RESULT_KEY[kind])
    if old.get("stage") == "done" and result:
        return Verdict("Succeeded", "Succeeded",
                       f"the Job {old.get('jobName')} is gone, but its pod had reported success: {result}")
    return Verdict("Failed", "JobLost",
                   f"the Job {old.get('jobName')} was deleted before the run's end was recorded; it is not "
                   f"created again (the work must never run twice). Delete and re-create the {kind} to run it "
                   "again", stalled=True)


def create_refused(code: int, message: str) -> Verdict | None:
    """The status for an API error on creating a child: 403/400 (quota, an admission webhook or
    policy) may clear up -- Pending and Stalled, retried with backoff; 422 (an invalid manifest,
    e.g. a bad affinity) will not -- Failed. None: not the user's to see (retry quietly)."""
    if code == 422:
        return Verdict("Failed", "CreateRejected", truncate(f"the API server rejected a child object: {message}"),
                       stalled=True)
    if code in (400, 403):
        return Verdict("Pending", "CreateFailed", truncate(
            f"the API server refused to create a child object (retried with backoff): {message}"), stalled=True)
    return None
