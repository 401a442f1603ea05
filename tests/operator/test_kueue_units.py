"""spec.suspend of a Kueue-queued job -> its Workload's spec.active (kubetune_operator.kueue), no cluster."""

from __future__ import annotations

from typing import Any

import pytest
from kobjects import jcond, job_dict
from kubetune_operator import kueue
from kubetune_operator.controller import Controller

KEY = ("FineTuneJob", "team-a", "demo")


def workload(name: str = "job-demo-train-1a2b3", uid: str = "job-uid", active: bool | None = None,
             created: str = "2026-01-01T00:00:00Z", ours: bool = False, deleting: bool = False,
             controller: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name, "namespace": "team-a", "creationTimestamp": created,
        "labels": {kueue.LABEL_JOB_UID: uid},
        "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "demo-train", "uid": uid,
                             "controller": controller}],
    }
    if ours:
        meta["annotations"] = {kueue.ANNOTATION_DEACTIVATED: kueue.DEACTIVATED_BY}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T02:00:00Z"
    spec: dict[str, Any] = {"queueName": "team"}
    if active is not None:
        spec["active"] = active
    return {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "Workload", "metadata": meta, "spec": spec}


class FakeKube:
    """Workloads by namespace; records every call."""

    def __init__(self, workloads: list[dict[str, Any]] | None = None) -> None:
        self.workloads = workloads or []
        self.calls: list[tuple] = []

    def list(self, kind: str, namespace: str, selector: str | None = None) -> list[dict[str, Any]]:
        self.calls.append(("list", kind, namespace, selector))
        key, _, value = (selector or "").partition("=")
        return [w for w in self.workloads if w["metadata"]["namespace"] == namespace
                and (not selector or w["metadata"]["labels"].get(key) == value)]

    def patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any], subresource: str | None = None):
        self.calls.append(("patch", kind, namespace, name, patch))
        for w in self.workloads:
            if w["metadata"]["name"] == name:
                for k, v in (patch.get("metadata") or {}).get("annotations", {}).items():
                    ann = w["metadata"].setdefault("annotations", {})
                    if v is None:
                        ann.pop(k, None)
                    else:
                        ann[k] = v
                w["spec"].update(patch.get("spec") or {})
                return w
        raise AssertionError(f"no workload {name}")


# ------------------------------------------------------------------------------ pure functions
def test_selector_is_the_job_uid_label():
    assert kueue.workload_selector(job_dict()) == "kueue.x-k8s.io/job-uid=job-uid"


def test_workload_for_job_needs_the_controller_owner_reference():
    job = job_dict()
    assert kueue.workload_for_job([], job) is None
    assert kueue.workload_for_job([workload(uid="other")], job) is None
    assert kueue.workload_for_job([workload(controller=False)], job) is None
    assert kueue.workload_for_job([workload(deleting=True)], job) is None
    old, new = workload("wl-old", created="2026-01-01T00:00:00Z"), workload("wl-new", created="2026-01-01T00:05:00Z")
    assert kueue.workload_for_job([new, old], job)["metadata"]["name"] == "wl-new"
    assert kueue.workload_for_job([old, workload("wl-gone", deleting=True, created="2026-01-02T00:00:00Z")],
                                  job)["metadata"]["name"] == "wl-old"


def test_is_active_defaults_to_true():
    assert kueue.is_active(workload()) and kueue.is_active(workload(active=True))
    assert not kueue.is_active(workload(active=False))


def test_active_patch_suspend():
    assert kueue.active_patch(workload(), suspend=True) == {
        "metadata": {"annotations": {kueue.ANNOTATION_DEACTIVATED: kueue.DEACTIVATED_BY}}, "spec": {"active": False}}
    assert kueue.active_patch(workload(active=False), suspend=True) is None  # already inactive: no write
    assert kueue.active_patch(workload(active=False, ours=True), suspend=True) is None


def test_active_patch_resume_only_what_the_operator_deactivated():
    assert kueue.active_patch(workload(active=False, ours=True), suspend=False) == {
        "metadata": {"annotations": {kueue.ANNOTATION_DEACTIVATED: None}}, "spec": {"active": True}}
    assert kueue.active_patch(workload(), suspend=False) is None
    assert kueue.active_patch(workload(active=True, ours=True), suspend=False) is None
    # deactivated by Kueue (e.g. the waitForPodsReady requeuing limit) or an admin: left alone
    assert kueue.active_patch(workload(active=False), suspend=False) is None


@pytest.mark.parametrize(("suspend", "job_suspended", "aligned", "check"), [
    (False, False, None, False),   # running: the Workload is admitted, hence active
    (False, False, True, False),   # (Kueue has not suspended it yet: the suspended Job will ask again)
    (False, True, None, True),     # waiting or deactivated, not known which: look once
    (False, True, False, False),   # known: nothing to do (pending jobs cost no call per event)
    (False, True, True, True),     # was suspended by us: re-activate
    (True, False, None, True),
    (True, False, True, True),     # a running Job despite a deactivated Workload: look again
    (True, True, None, True),
    (True, True, False, True),
    (True, True, True, False),     # done
])
def test_needs_check(suspend, job_suspended, aligned, check):
    assert kueue.needs_check(job_dict(suspend=job_suspended), suspend, aligned) is check


def test_recheck_delay_backs_off_to_five_minutes():
    assert [kueue.recheck_delay(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert kueue.recheck_delay(30) == 300.0


def test_aligned_memo_is_bounded():
    memo = kueue.Aligned(size=2)
    memo.set("a", True)
    memo.set("b", False)
    memo.set("c", True)
    assert (memo.get("a"), memo.get("b"), memo.get("c")) == (None, False, True)
    assert memo.miss("d") == 1 and memo.miss("d") == 2
    memo.set("d", True)
    assert memo.miss("d") == 1  # a hit resets the count
    memo.forget("c")
    assert memo.get("c") is None


# ------------------------------------------------------------------------------ align (calls)
def test_align_suspend_deactivates_once_then_makes_no_call():
    kube, memo = FakeKube([workload()]), kueue.Aligned()
    assert kueue.align(kube, job_dict(), True, memo) is None
    assert kube.calls == [("list", "Workload", "team-a", "kueue.x-k8s.io/job-uid=job-uid"),
                          ("patch", "Workload", "team-a", "job-demo-train-1a2b3",
                           {"metadata": {"annotations": {kueue.ANNOTATION_DEACTIVATED: kueue.DEACTIVATED_BY}},
                            "spec": {"active": False}})]
    kube.calls.clear()
    kueue.align(kube, job_dict(suspend=False), True, memo)  # Kueue has not suspended the Job yet: look
    assert [c[0] for c in kube.calls] == ["list"]
    kube.calls.clear()
    for _ in range(3):  # the watch events that follow (Job suspended, pod deleted, status echo)
        kueue.align(kube, job_dict(suspend=True), True, memo)
    assert kube.calls == []


def test_align_resume_reactivates_then_makes_no_call():
    kube, memo = FakeKube([workload(active=False, ours=True)]), kueue.Aligned()
    kueue.align(kube, job_dict(suspend=True), False, memo)
    assert kube.calls[-1] == ("patch", "Workload", "team-a", "job-demo-train-1a2b3",
                              {"metadata": {"annotations": {kueue.ANNOTATION_DEACTIVATED: None}},
                               "spec": {"active": True}})
    assert kueue.is_active(kube.workloads[0]) and not kueue.deactivated_by_us(kube.workloads[0])
    kube.calls.clear()
    kueue.align(kube, job_dict(suspend=True), False, memo)   # waiting for re-admission
    kueue.align(kube, job_dict(suspend=False), False, memo)  # running again
    assert kube.calls == []


def test_align_pending_job_is_read_once():
    kube, memo = FakeKube([workload()]), kueue.Aligned()
    for _ in range(5):
        kueue.align(kube, job_dict(suspend=True), False, memo)
    assert [c[0] for c in kube.calls] == ["list"]


def test_align_running_job_makes_no_call_even_after_a_restart():
    kube = FakeKube([workload()])
    kueue.align(kube, job_dict(suspend=False), False, kueue.Aligned())
    assert kube.calls == []


def test_align_suspend_before_kueue_made_the_workload_asks_to_look_again():
    kube, memo = FakeKube([]), kueue.Aligned()
    assert kueue.align(kube, job_dict(suspend=True), True, memo) == 1.0
    assert kueue.align(kube, job_dict(suspend=True), True, memo) == 2.0
    kube.workloads.append(workload())
    assert kueue.align(kube, job_dict(suspend=True), True, memo) is None
    assert kube.calls[-1][0] == "patch" and not kueue.is_active(kube.workloads[0])


def test_align_resume_without_workload_needs_nothing():
    kube, memo = FakeKube([]), kueue.Aligned()
    assert kueue.align(kube, job_dict(suspend=True), False, memo) is None
    assert memo.get("job-uid") is False


def test_align_leaves_a_workload_kueue_deactivated():
    kube, memo = FakeKube([workload(active=False)]), kueue.Aligned()
    kueue.align(kube, job_dict(suspend=True), False, memo)
    assert [c[0] for c in kube.calls] == ["list"] and not kueue.is_active(kube.workloads[0])


# ------------------------------------------------------------------------------ the controller's call
class RecordingQueue:
    def __init__(self) -> None:
        self.after: list[tuple] = []

    def add_after(self, key, seconds) -> None:
        self.after.append((key, seconds))

    def __len__(self) -> int:
        return 0


def _controller(kube: FakeKube) -> Controller:
    ctl = Controller(kube=kube)  # type: ignore[arg-type]
    ctl.queue = RecordingQueue()  # type: ignore[assignment]
    return ctl


def test_controller_never_patches_a_queued_job():
    kube = FakeKube([workload()])
    ctl = _controller(kube)
    job = job_dict(suspend=False)
    assert ctl._align_suspend(job, True, True, KEY) is job
    assert [(c[0], c[1]) for c in kube.calls] == [("list", "Workload"), ("patch", "Workload")]
    assert ctl.queue.after == []


def test_controller_looks_again_when_the_workload_is_not_there_yet():
    ctl = _controller(FakeKube([]))
    ctl._align_suspend(job_dict(suspend=True), True, True, KEY)
    assert ctl.queue.after == [(KEY, 1.0)]


def test_controller_forgets_finished_jobs_and_still_patches_unqueued_ones():
    kube = FakeKube([workload()])
    ctl = _controller(kube)
    ctl._align_suspend(job_dict(suspend=True), True, True, KEY)
    assert ctl._kueue_aligned.get("job-uid") is True
    done = job_dict(conditions=[jcond("Complete")])
    ctl._align_suspend(done, True, True, KEY)
    assert ctl._kueue_aligned.get("job-uid") is None

    class JobKube(FakeKube):
        def patch(self, kind, namespace, name, patch, subresource=None):
            self.calls.append(("patch", kind, namespace, name, patch))
            return {**job_dict(suspend=patch["spec"]["suspend"]), "kind": "Job"}

    plain = JobKube()
    ctl = _controller(plain)
    assert ctl._align_suspend(job_dict(suspend=False), True, False, KEY)["spec"]["suspend"] is True
    assert plain.calls == [("patch", "Job", "team-a", "demo-train", {"spec": {"suspend": True}})]


@pytest.mark.parametrize("status", [403, 404])
def test_align_without_kueue_or_rbac_does_not_fail_the_reconcile(status):
    from kubetune_operator.kube import ApiError

    class NoKueue(FakeKube):
        def list(self, kind, namespace, selector=None):
            raise ApiError(status, "GET", "/apis/kueue.x-k8s.io/v1beta2/namespaces/team-a/workloads", "{}")

    memo = kueue.Aligned()
    assert kueue.align(NoKueue(), job_dict(suspend=True), True, memo) == 1.0  # looked at again, backing off
    assert kueue.align(NoKueue(), job_dict(suspend=True), False, memo) is None


def test_align_other_api_errors_raise():
    from kubetune_operator.kube import ApiError

    class Broken(FakeKube):
        def list(self, kind, namespace, selector=None):
            raise ApiError(500, "GET", "/x", "{}")

    with pytest.raises(ApiError):
        kueue.align(Broken(), job_dict(suspend=True), True, kueue.Aligned())


def test_workload_state_in_kueues_words():
    def wl(*conds: dict[str, Any]) -> dict[str, Any]:
        return {"metadata": {"name": "w"}, "status": {"conditions": list(conds)}}

    pending = {"type": "QuotaReserved", "status": "False", "reason": "Pending",
               "message": "couldn't assign flavors to pod set main: insufficient quota for nvidia.com/gpu"}
    assert kueue.workload_state(wl(pending)) == (
        "WaitingForAdmission", "waiting for admission by Kueue: couldn't assign flavors to pod set main: "
                               "insufficient quota for nvidia.com/gpu")
    preempted = {"type": "Evicted", "status": "True", "reason": "Preempted",
                 "message": "Preempted to accommodate a workload (UID: u) due to prioritization in the ClusterQueue"}
    reason, message = kueue.workload_state(wl(preempted, pending))
    assert reason == "Preempted" and "prioritization" in message and "resumes" in message
    admitted_again = {"type": "QuotaReserved", "status": "True", "reason": "QuotaReserved", "message": ""}
    assert kueue.workload_state(wl(preempted, admitted_again)) is None
    timeout = {"type": "Evicted", "status": "True", "reason": "PodsReadyTimeout",
               "message": "Exceeded the PodsReady timeout"}
    reason, message = kueue.workload_state(wl(timeout, pending))
    assert reason == "Evicted" and message.startswith("evicted (PodsReadyTimeout) by Kueue (Exceeded")
    deactivated = {"type": "Evicted", "status": "True", "reason": "Deactivated", "message": "spec.active false"}
    assert kueue.workload_state(wl(deactivated)) is None  # our own suspend: the status says Suspended
    assert kueue.workload_state(None) is None
