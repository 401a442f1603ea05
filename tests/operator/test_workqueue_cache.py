"""The operator's work queue and informer cache (pure, no cluster)."""

from __future__ import annotations

import threading

from kubetune_operator.cache import Cache, slim
from kubetune_operator.workqueue import WorkQueue


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_waiting_key_is_queued_once():
    q = WorkQueue()
    for key in ("a", "b", "a", "a", "b"):
        q.add(key)
    assert len(q) == 2
    assert [q.get(0), q.get(0), q.get(0)] == ["a", "b", None]


def test_a_key_is_never_held_by_two_workers_and_comes_back_when_re_added():
    q = WorkQueue()
    q.add("a")
    assert q.get(0) == "a"
    q.add("a")  # an event while a worker holds it
    assert q.get(0) is None  # not handed out twice
    q.done("a")
    assert q.get(0) == "a"  # queued again for the new event
    q.done("a")
    assert q.get(0) is None


def test_add_after_keeps_the_earliest_time_and_discard_cancels():
    clock = FakeClock()
    q = WorkQueue(clock=clock)
    q.add_after("a", 60)
    q.add_after("a", 5)
    q.add_after("a", 600)
    q.add_after("b", 10)
    assert q.get(0) is None
    clock.now += 5
    assert q.get(0) == "a"
    q.done("a")
    clock.now += 100
    q.discard("b")
    assert q.get(0) is None  # b was discarded; a's later entries were superseded


def test_retry_backs_off_exponentially_up_to_the_maximum_and_forget_resets():
    q = WorkQueue(backoff_first=5, backoff_max=30, clock=FakeClock())
    assert [q.retry("a") for _ in range(5)] == [5, 10, 20, 30, 30]
    q.forget("a")
    assert q.retry("a") == 5


def test_get_blocks_until_a_key_or_shutdown():
    q = WorkQueue()
    got: list[object] = []
    worker = threading.Thread(target=lambda: got.extend([q.get(), q.get()]))
    worker.start()
    q.add("a")
    q.shutdown()
    worker.join(5)
    assert not worker.is_alive() and got == ["a", None]


def _job(uid: str, rv: str, owner: str = "FineTuneJob/demo", **spec) -> dict:
    return {"kind": "Job", "metadata": {"name": "demo-train", "namespace": "ns", "uid": uid, "resourceVersion": rv,
                                        "annotations": {"kubetune.dev/owner": owner}, "managedFields": [{"x": 1}]},
            "spec": {"suspend": False, "template": {"spec": {"containers": [{"name": "c"}]}}, **spec},
            "status": {"active": 1}}


def _pod(name: str, job_uid: str, rv: str = "1") -> dict:
    return {"kind": "Pod", "metadata": {"name": name, "namespace": "ns", "uid": f"uid-{name}", "resourceVersion": rv,
                                        "labels": {"batch.kubernetes.io/controller-uid": job_uid},
                                        "annotations": {"kubetune.dev/owner": "FineTuneJob/demo"}},
            "spec": {"containers": [{"name": "c", "env": [{"name": "X", "value": "y" * 1000}]}]},
            "status": {"phase": "Pending"}}


def test_slim_keeps_what_the_status_reads():
    job = slim(_job("u1", "5", activeDeadlineSeconds=60))
    assert job["spec"] == {"suspend": False, "activeDeadlineSeconds": 60}
    assert "managedFields" not in job["metadata"] and job["status"] == {"active": 1}
    pod = slim(_pod("p", "u1"))
    assert "spec" not in pod and pod["status"] == {"phase": "Pending"}
    body = {"kind": "FineTuneJob", "metadata": {"name": "demo", "annotations": {
        "kubectl.kubernetes.io/last-applied-configuration": "{...}", "team": "a"}}, "spec": {"a": 1}}
    assert slim(body)["metadata"]["annotations"] == {"team": "a"} and slim(body)["spec"] == {"a": 1}


def test_children_are_filed_under_their_owner_and_older_versions_are_ignored():
    cache = Cache()
    key = ("FineTuneJob", "ns", "demo")
    assert cache.put_child(_job("u1", "7")) == key
    assert cache.put_child(_job("u1", "6", suspend=True)) == key  # an in-flight older event
    assert cache.job(key)["spec"]["suspend"] is False
    cache.put_child(_pod("a", "u1"))
    cache.put_child(_pod("old", "u0"))  # a pod of an earlier Job with the same name
    assert [p["metadata"]["name"] for p in cache.pods(key, "u1")] == ["a"]
    assert cache.put_child({**_job("u2", "1"), "metadata": {"name": "x", "namespace": "ns"}}) is None  # not ours
    cache.drop_child(_job("u0", "9"))  # another uid: keeps the current Job
    assert cache.job(key) is not None
    cache.drop_child(_job("u1", "8"))
    cache.drop_child(_pod("a", "u1"))
    assert cache.job(key) is None and cache.pods(key, "u1") == []


def test_resources_and_merge_jobs_referencing_a_finetunejob():
    cache = Cache()
    ftj = {"kind": "FineTuneJob", "metadata": {"name": "base", "namespace": "ns", "uid": "f", "resourceVersion": "3"},
           "status": {"phase": "Running"}}
    cache.put(ftj)
    cache.put({**ftj, "metadata": {**ftj["metadata"], "resourceVersion": "2"}, "status": {"phase": "Pending"}})
    assert cache.get(("FineTuneJob", "ns", "base"))["status"] == {"phase": "Running"}
    for name, ref, ns in (("m1", "base", "ns"), ("m2", "other", "ns"), ("m3", "base", "elsewhere")):
        cache.put({"kind": "MergeJob", "metadata": {"name": name, "namespace": ns, "uid": name},
                   "spec": {"source": {"fineTuneJobRef": {"name": ref}}}})
    assert cache.merge_jobs_referencing("ns", "base") == [("MergeJob", "ns", "m1")]
    cache.drop(("MergeJob", "ns", "m1"))
    assert cache.merge_jobs_referencing("ns", "base") == []


def _st(phase: str, reason: str, stalled: bool = False) -> dict:
    conds = [{"type": "Ready", "status": "False", "reason": reason}]
    if stalled:
        conds.append({"type": "Stalled", "status": "True", "reason": reason})
    return {"phase": phase, "message": f"{reason} happened", "conditions": conds}


def test_events_mark_transitions_that_matter_not_every_pending_step():
    from kubetune_operator.controller import transition_event

    assert transition_event({}, _st("Pending", "Starting")) is None  # JobCreated already says it
    assert transition_event(_st("Pending", "Starting"), _st("Pending", "PodPending")) is None
    assert transition_event(_st("Pending", "PodPending"), _st("Pending", "Unschedulable")) == (
        "Warning", "Unschedulable", "Pending: Unschedulable happened")
    assert transition_event(_st("Pending", "PodPending"), _st("Running", "Running"))[:2] == ("Normal", "Running")
    assert transition_event(_st("Running", "Running"), _st("Running", "Running")) is None
    assert transition_event(_st("Running", "Running"), _st("Running", "Retrying"))[:2] == ("Warning", "Retrying")
    assert transition_event({}, _st("Failed", "SecretNotFound", stalled=True))[:2] == ("Warning", "SecretNotFound")
    assert transition_event(_st("Pending", "PodPending"), _st("Pending", "ImagePullBackOff", stalled=True))[0] == \
        "Warning"
    assert transition_event(_st("Running", "Running"), _st("Succeeded", "Succeeded"))[:2] == ("Normal", "Succeeded")


def test_a_write_answer_never_brings_back_a_deleted_resource():
    cache = Cache()
    body = {"kind": "FineTuneJob", "metadata": {"name": "x", "namespace": "ns", "uid": "u", "resourceVersion": "5"}}
    cache.update(body)
    assert cache.get(("FineTuneJob", "ns", "x")) is None
    cache.put(body)
    cache.update({**body, "metadata": {**body["metadata"], "resourceVersion": "6"}, "status": {"phase": "Running"}})
    assert cache.get(("FineTuneJob", "ns", "x"))["status"] == {"phase": "Running"}
