"""The operator with real Kueue (``hack/kueue.py``: Kueue's manager built from its Go module) on the
real control plane: admission through a ClusterQueue's GPU quota, preemption by a higher
WorkloadPriorityClass, and ``spec.suspend`` of a queued job through ``Workload.spec.active``
without a fight with Kueue.

Pods are pinned to ``runner-node`` and the tests play kubelet, as in test_cluster_finetune.py. The
module's fixture builds Kueue when it is not cached (minutes, once); a Kueue that cannot be built
or started fails these tests, it does not skip them.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clusterkit import (
    RUNNER,
    create,
    create_s3_secret,
    force_delete,
    ftj_spec,
    job,
    kubelet_exit,
    kubelet_run,
    phase_is,
    pods,
    ready,
    term_message,
    wait_for,
    wait_pod,
    wait_status,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "hack"))
import kueue as kueue_mod  # noqa: E402  (hack/kueue.py)

OPERATOR = "system:serviceaccount:kubetune-system:kubetune-operator"
FLAVOR = "kubetune-test-flavor"
HIGH = "kubetune-test-high"


@pytest.fixture(scope="module")
def kueue(cluster: Any) -> Iterator[kueue_mod.Kueue]:
    """Kueue's manager on the session's cluster for this module (built first when not cached), with
    a ResourceFlavor and a WorkloadPriorityClass."""
    k = kueue_mod.Kueue.start(cluster)
    try:
        k.create(kueue_mod.resource_flavor(FLAVOR))
        k.create(kueue_mod.workload_priority_class(HIGH, 1000))
        yield k
    finally:
        # (the tests' namespaces stay Terminating: their pods on runner-node have no kubelet to
        # confirm the deletion; the session's cluster goes away with them)
        k.delete_created()
        k.stop()


def queues(k: kueue_mod.Kueue, ns: str, gpus: int) -> str:
    """A ClusterQueue (``gpus`` nvidia.com/gpu, preemption LowerPriority) for this test and the
    LocalQueue ``team`` in ``ns``; returns the LocalQueue's name."""
    k.create(kueue_mod.cluster_queue(f"cq-{ns}", FLAVOR, gpus=gpus))
    k.create(kueue_mod.local_queue(ns, "team", f"cq-{ns}"))
    wait_for(lambda: _cond(k.get("ClusterQueue", f"cq-{ns}"), "Active") == "True", 30, "ClusterQueue active")
    return "team"


def _cond(obj: dict[str, Any] | None, ctype: str) -> str | None:
    return next((c["status"] for c in ((obj or {}).get("status") or {}).get("conditions") or []
                 if c["type"] == ctype), None)


def _cond_reason(obj: dict[str, Any] | None, ctype: str) -> str | None:
    return next((c.get("reason") for c in ((obj or {}).get("status") or {}).get("conditions") or []
                 if c["type"] == ctype and c["status"] == "True"), None)


def workload_of(k: kueue_mod.Kueue, ns: str, job_name: str) -> dict[str, Any] | None:
    j = job(k.cluster, ns, job_name)
    if j is None:
        return None
    items = k.workloads(ns, f"kueue.x-k8s.io/job-uid={j['metadata']['uid']}")
    return items[0] if items else None


def wait_workload(k: kueue_mod.Kueue, ns: str, job_name: str, pred: Any, timeout: float = 60,
                  what: str = "") -> dict[str, Any]:
    try:
        return wait_for(lambda: (lambda w: w if w and pred(w) else None)(workload_of(k, ns, job_name)), timeout,
                        what or f"Workload of {job_name}")
    except AssertionError as err:
        raise AssertionError(f"{err}\nworkload: {json.dumps(workload_of(k, ns, job_name), indent=1)[-3000:]}"
                             ) from None


def admitted(w: dict[str, Any]) -> bool:
    return _cond(w, "Admitted") == "True"


def patch_ftj(c: Any, ns: str, name: str, spec: dict[str, Any]) -> None:
    c.request("PATCH", f"/apis/kubetune.dev/v1alpha1/namespaces/{ns}/finetunejobs/{name}", {"spec": spec},
              content_type="application/merge-patch+json")


def run_first_pod(c: Any, ns: str, name: str) -> dict[str, Any]:
    pod = wait_pod(c, ns, f"{name}-train")
    kubelet_run(c, pod)
    wait_status(c, ns, "FineTuneJob", name, phase_is("Running"), 30)
    return pod


def stop_like_the_trainer(c: Any, ns: str, pod: dict[str, Any], step: int) -> None:
    """The Job controller deletes the pod of a suspended Job; the trainer checkpoints on SIGTERM and
    exits 7; the kubelet removes the pod."""
    name = pod["metadata"]["name"]
    wait_for(lambda: next((p for p in pods(c, ns, pod["metadata"]["labels"]["batch.kubernetes.io/job-name"])
                           if p["metadata"]["name"] == name and p["metadata"].get("deletionTimestamp")), None),
             30, f"pod {name} terminating")
    kubelet_exit(c, pod, 7, term_message("Preempted", f"stopped after checkpoint step {step}",
                                         checkpointUri=f"s3://out/run-1/checkpoints/step-{step}"))
    force_delete(c, pod)


def operator_requests(c: Any, ns: str, resource: str, verb: str) -> list[dict[str, Any]]:
    return [e for e in c.audit_events(OPERATOR)
            if e.get("verb") == verb and (e.get("objectRef") or {}).get("resource") == resource
            and (e.get("objectRef") or {}).get("namespace") == ns]


def unsuspends_logged(k: kueue_mod.Kueue, ns: str, job_name: str) -> int:
    """Kueue's job reconciler's "Job admitted, unsuspending" lines for the Job (logged at V(2))."""
    text = k.log_file.read_text(errors="replace") if k.log_file.exists() else ""
    return sum(1 for line in text.splitlines() if "Job admitted, unsuspending" in line and f"{ns}/{job_name}" in line)


class JobWatch(threading.Thread):
    """Every version of one Job the API server sends on a watch for ``seconds``."""

    def __init__(self, c: Any, ns: str, name: str, seconds: int) -> None:
        super().__init__(daemon=True)
        self.c, self.seconds = c, seconds
        self.url = (f"{c.server}/apis/batch/v1/namespaces/{ns}/jobs?watch=true"
                    f"&fieldSelector=metadata.name%3D{name}&timeoutSeconds={seconds}")
        self.events: list[dict[str, Any]] = []
        self.started_watch = threading.Event()

    def run(self) -> None:
        req = urllib.request.Request(self.url, headers={"Accept": "application/json"})
        with urllib.request.urlopen(req, context=self.c.ssl_context(), timeout=self.seconds + 30) as r:
            self.started_watch.set()
            for line in r:
                if line.strip():
                    self.events.append(json.loads(line))

    def suspend_values(self) -> list[bool]:
        return [bool(e["object"]["spec"].get("suspend")) for e in self.events if e.get("type") in ("ADDED", "MODIFIED")]


def flips(values: list[bool]) -> int:
    return sum(1 for a, b in zip(values, values[1:], strict=False) if a != b)


def urgent_job(ns: str, queue: str) -> dict[str, Any]:
    """A plain batch/v1 Job in the same queue with the higher WorkloadPriorityClass (the FineTuneJob
    API has no priority class field)."""
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "urgent", "namespace": ns,
                     "labels": {"kueue.x-k8s.io/queue-name": queue, "kueue.x-k8s.io/priority-class": HIGH}},
        "spec": {"suspend": True, "backoffLimit": 0, "template": {"spec": {
            "restartPolicy": "Never", "nodeSelector": dict(RUNNER),
            "containers": [{"name": "main", "image": "kubetune/urgent:test",
                            "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}}},
    }


# ------------------------------------------------------------------------------ the tests
def test_admitted_through_gpu_quota_second_waits(cluster, ns, kueue, operator_proc):
    queue = queues(kueue, ns, gpus=1)
    create_s3_secret(cluster, ns)
    create(cluster, ns, "FineTuneJob", "first", ftj_spec(queueName=queue))
    j = wait_for(lambda: job(cluster, ns, "first-train"), 60, "Job first-train")
    assert j["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == queue
    w = wait_workload(kueue, ns, "first-train", admitted, 60, "first admitted")
    assert w["status"]["admission"]["clusterQueue"] == f"cq-{ns}"
    usage = w["status"]["admission"]["podSetAssignments"][0]["resourceUsage"]
    assert usage["nvidia.com/gpu"] == "1"
    wait_for(lambda: not job(cluster, ns, "first-train")["spec"]["suspend"], 30, "Kueue unsuspends the Job")
    first = run_first_pod(cluster, ns, "first")

    create(cluster, ns, "FineTuneJob", "second", ftj_spec(queueName=queue))
    w2 = wait_workload(kueue, ns, "second-train", lambda w: _cond(w, "QuotaReserved") == "False", 60,
                       "second pending")
    assert "insufficient" in json.dumps(w2["status"]["conditions"]).lower(), w2["status"]
    # the status says why, in Kueue's words (which quota, how much more)
    st = wait_status(cluster, ns, "FineTuneJob", "second",
                     lambda s: phase_is("Pending", "WaitingForAdmission")(s) and "insufficient" in s["message"], 60)
    assert st["message"].startswith("waiting for admission by Kueue:") and "nvidia.com/gpu" in st["message"]
    events = cluster.request("GET", f"/api/v1/namespaces/{ns}/events?fieldSelector=involvedObject.name%3Dsecond")
    assert [e for e in events["items"] if e["reason"] == "WaitingForAdmission" and "insufficient" in e["message"]]
    time.sleep(3)
    assert job(cluster, ns, "second-train")["spec"]["suspend"] is True
    assert pods(cluster, ns, "second-train") == []
    assert not admitted(workload_of(kueue, ns, "second-train"))

    # the first one ends: its quota goes to the second
    kubelet_exit(cluster, first, 0, term_message("Completed", "trained 10 steps"))
    wait_status(cluster, ns, "FineTuneJob", "first", phase_is("Succeeded"), 60)
    wait_workload(kueue, ns, "second-train", admitted, 60, "second admitted after the first finished")
    run_first_pod(cluster, ns, "second")
    assert operator_requests(cluster, ns, "jobs", "patch") == []  # queued Jobs are Kueue's to (un)suspend
    assert "Forbidden" not in operator_proc.logs(), operator_proc.logs()[-3000:]


def test_higher_priority_preempts_then_the_low_one_runs_again(cluster, ns, kueue, operator_proc):
    queue = queues(kueue, ns, gpus=1)
    create_s3_secret(cluster, ns)
    create(cluster, ns, "FineTuneJob", "low", ftj_spec(queueName=queue))
    wait_workload(kueue, ns, "low-train", admitted, 60, "low admitted")
    low_pod = run_first_pod(cluster, ns, "low")

    cluster.request("POST", f"/apis/batch/v1/namespaces/{ns}/jobs", urgent_job(ns, queue))
    w = wait_workload(kueue, ns, "low-train", lambda w: _cond_reason(w, "Evicted") == "Preempted", 60,
                      "low preempted")
    assert _cond(w, "Preempted") == "True"
    wait_for(lambda: job(cluster, ns, "low-train")["spec"]["suspend"], 30, "Kueue suspends the low Job")
    st = wait_status(cluster, ns, "FineTuneJob", "low", phase_is("Running", "Suspending"), 30)
    assert low_pod["metadata"]["name"] in st["message"]
    stop_like_the_trainer(cluster, ns, low_pod, step=4)
    st = wait_status(cluster, ns, "FineTuneJob", "low", phase_is("Pending", "Preempted"), 60)
    assert st["message"].startswith("preempted by Kueue") and "resumes from its last checkpoint" in st["message"]
    assert st.get("checkpointUri", "s3://out/run-1/checkpoints/step-4") == "s3://out/run-1/checkpoints/step-4"
    events = cluster.request("GET", f"/api/v1/namespaces/{ns}/events?fieldSelector=involvedObject.name%3Dlow")
    assert any(e["reason"] == "Preempted" and e["type"] == "Warning" for e in events["items"]), events["items"]

    # the urgent one runs and ends; the low one is admitted again and resumes
    wait_workload(kueue, ns, "urgent", admitted, 60, "urgent admitted")
    urgent_pod = wait_pod(cluster, ns, "urgent")
    kubelet_run(cluster, urgent_pod)
    kubelet_exit(cluster, urgent_pod, 0)
    wait_for(lambda: _cond(workload_of(kueue, ns, "urgent"), "Finished") == "True", 60, "urgent finished")
    wait_workload(kueue, ns, "low-train", admitted, 60, "low admitted again")
    wait_for(lambda: not job(cluster, ns, "low-train")["spec"]["suspend"], 30, "low Job unsuspended")
    second = wait_for(lambda: next((p for p in pods(cluster, ns, "low-train") if p["spec"].get("nodeName")
                                    and p["metadata"]["name"] != low_pod["metadata"]["name"]), None), 60, "new pod")
    kubelet_run(cluster, second)
    wait_status(cluster, ns, "FineTuneJob", "low", phase_is("Running"), 30)
    assert operator_requests(cluster, ns, "jobs", "patch") == []


def test_suspend_deactivates_the_workload_without_a_fight(cluster, ns, kueue, operator_proc):
    queue = queues(kueue, ns, gpus=1)
    create_s3_secret(cluster, ns)
    create(cluster, ns, "FineTuneJob", "pausable", ftj_spec(queueName=queue))
    wait_workload(kueue, ns, "pausable-train", admitted, 60, "admitted")
    pod = run_first_pod(cluster, ns, "pausable")
    assert unsuspends_logged(kueue, ns, "pausable-train") == 1

    watch = JobWatch(cluster, ns, "pausable-train", seconds=40)  # from before the suspend to 30+ s after
    watch.start()
    assert watch.started_watch.wait(10)
    t0 = time.monotonic()
    patch_ftj(cluster, ns, "pausable", {"suspend": True})
    w = wait_workload(kueue, ns, "pausable-train", lambda w: w["spec"].get("active") is False, 30, "deactivated")
    assert w["metadata"]["annotations"]["kubetune.dev/deactivated-by"] == "spec.suspend"
    wait_workload(kueue, ns, "pausable-train", lambda w: _cond_reason(w, "Evicted") == "Deactivated", 30, "evicted")
    wait_for(lambda: job(cluster, ns, "pausable-train")["spec"]["suspend"], 30, "Kueue suspends the Job")
    stop_like_the_trainer(cluster, ns, pod, step=4)
    st = wait_status(cluster, ns, "FineTuneJob", "pausable", phase_is("Suspended"), 30)
    assert {c["type"]: c["status"] for c in st["conditions"]}["Suspended"] == "True"
    suspended_after = time.monotonic() - t0
    watch.join(60)
    assert not watch.is_alive()

    # no fight: over the whole window (30+ s after Suspended) the Job flipped once, to suspended,
    # no new pod came, Kueue never un-suspended it, and the operator wrote the Workload once
    values = watch.suspend_values()
    assert values[0] is False and values[-1] is True and flips(values) == 1, values
    assert 40 - suspended_after >= 20, suspended_after
    assert [p["metadata"]["name"] for p in pods(cluster, ns, "pausable-train")] == []
    assert unsuspends_logged(kueue, ns, "pausable-train") == 1
    assert workload_of(kueue, ns, "pausable-train")["spec"]["active"] is False
    assert len(operator_requests(cluster, ns, "workloads", "patch")) == 1
    assert operator_requests(cluster, ns, "jobs", "patch") == []
    assert get_ftj_phase(cluster, ns, "pausable") == "Suspended"

    # resume: the Workload is active again, re-admitted, and the Job runs a new pod
    patch_ftj(cluster, ns, "pausable", {"suspend": False})
    w = wait_workload(kueue, ns, "pausable-train", lambda w: w["spec"].get("active", True) and admitted(w), 60,
                      "re-admitted")
    assert "kubetune.dev/deactivated-by" not in (w["metadata"].get("annotations") or {})
    wait_for(lambda: not job(cluster, ns, "pausable-train")["spec"]["suspend"], 30, "Job resumed")
    second = wait_pod(cluster, ns, "pausable-train")
    assert second["metadata"]["name"] != pod["metadata"]["name"]
    kubelet_run(cluster, second)
    st = wait_status(cluster, ns, "FineTuneJob", "pausable", phase_is("Running"), 30)
    assert ready(st)["reason"] == "Running"
    assert len(operator_requests(cluster, ns, "workloads", "patch")) == 2
    assert operator_requests(cluster, ns, "jobs", "patch") == []
    assert unsuspends_logged(kueue, ns, "pausable-train") == 2
    assert "Forbidden" not in operator_proc.logs(), operator_proc.logs()[-3000:]


def get_ftj_phase(c: Any, ns: str, name: str) -> str | None:
    obj = c.request("GET", f"/apis/kubetune.dev/v1alpha1/namespaces/{ns}/finetunejobs/{name}")
    return (obj.get("status") or {}).get("phase")


def test_a_two_node_job_is_one_workload_admitted_whole(cluster, ns, kueue, operator_proc):
    """resources.nodes: 2 is one Workload of 2 pods (Kueue's Indexed Job integration): with quota for
    one GPU it waits with no pod at all (no half-started group holding a GPU); with quota for both it
    is admitted at once and both pods start (docs/distributed.md)."""
    queue = queues(kueue, ns, gpus=1)
    create_s3_secret(cluster, ns)
    two = {"gpus": 1, "nodes": 2, "nodeSelector": dict(RUNNER)}
    create(cluster, ns, "FineTuneJob", "pair", ftj_spec(queueName=queue, resources=two))
    w = wait_workload(kueue, ns, "pair-train", lambda w: _cond(w, "QuotaReserved") == "False", 60, "pair pending")
    (podset,) = w["spec"]["podSets"]
    assert podset["count"] == 2
    assert "insufficient" in json.dumps(w["status"]["conditions"]).lower(), w["status"]
    time.sleep(3)
    assert job(cluster, ns, "pair-train")["spec"]["suspend"] is True and pods(cluster, ns, "pair-train") == []
    wait_status(cluster, ns, "FineTuneJob", "pair", phase_is("Pending", "WaitingForAdmission"), 30)

    # quota for two GPUs: admitted whole, both pods start
    groups = kueue_mod.cluster_queue(f"cq-{ns}", FLAVOR, gpus=2)["spec"]["resourceGroups"]
    cluster.request("PATCH", kueue_mod.object_path("ClusterQueue", f"cq-{ns}"), {"spec": {"resourceGroups": groups}},
                    content_type="application/merge-patch+json")
    w = wait_workload(kueue, ns, "pair-train", admitted, 60, "pair admitted")
    assert w["status"]["admission"]["podSetAssignments"][0]["count"] == 2
    assert w["status"]["admission"]["podSetAssignments"][0]["resourceUsage"]["nvidia.com/gpu"] == "2"
    wait_for(lambda: len([p for p in pods(cluster, ns, "pair-train") if p["spec"].get("nodeName")]) == 2, 60,
             "both pods scheduled")


def test_only_the_gpu_job_is_queued_the_prepare_stage_runs_while_the_quota_is_taken(cluster, ns, kueue,
                                                                                   operator_proc):
    """Issue #18: the CPU prepare Job holds no quota and is not queued, so a job's data is prepared
    while the GPUs are busy with another; only its GPU Job then waits for admission."""
    queue = queues(kueue, ns, gpus=1)
    create_s3_secret(cluster, ns)
    create(cluster, ns, "FineTuneJob", "busy", ftj_spec(queueName=queue))
    wait_workload(kueue, ns, "busy-train", admitted, 60, "busy admitted")
    run_first_pod(cluster, ns, "busy")  # the only GPU of the ClusterQueue is taken

    create(cluster, ns, "FineTuneJob", "next", ftj_spec(queueName=queue, prepare={"mode": "separate",
                                                                                    "nodeSelector": dict(RUNNER)}))
    prep = wait_for(lambda: job(cluster, ns, "next-prepare"), 60, "Job next-prepare")
    assert "kueue.x-k8s.io/queue-name" not in prep["metadata"]["labels"] and prep["spec"]["suspend"] is False
    pod = wait_pod(cluster, ns, "next-prepare")
    kubelet_run(cluster, pod)
    wait_status(cluster, ns, "FineTuneJob", "next", lambda s: ready(s).get("reason") == "Preparing", 30)
    assert workload_of(kueue, ns, "next-prepare") is None  # Kueue does not manage it
    kubelet_exit(cluster, pod, 0, term_message("Prepared", "data prepared"))
    wait_workload(kueue, ns, "next-train", lambda w: _cond(w, "QuotaReserved") == "False", 60, "next-train queued")
    wait_status(cluster, ns, "FineTuneJob", "next", phase_is("Pending", "WaitingForAdmission"), 60)
    assert job(cluster, ns, "next-train")["spec"]["suspend"] is True and pods(cluster, ns, "next-train") == []
