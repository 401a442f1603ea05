"""The pure parts of the fault handling (docs/operator.md, "Under faults"): startup timeouts, a Job
lost before its end was recorded, refused creates, uid-derived support names, relist pruning."""

from __future__ import annotations

import pytest
from kobjects import job_dict, pod_dict
from kubetune_operator import builders, status
from kubetune_operator.cache import Cache


def _pending(reason: str, message: str = "stuck") -> dict:
    return {"phase": "Pending", "message": message,
            "conditions": [{"type": "Ready", "status": "False", "reason": reason}]}


def _pod(name: str, created: str, **kw) -> dict:
    pod = pod_dict(name, "Pending", **kw)
    pod["metadata"]["creationTimestamp"] = created
    return pod


def test_startup_timeout_counts_from_the_stuck_pod():
    job = job_dict("demo-train")
    pod = _pod("demo-train-a", "2026-01-01T00:00:00Z")
    st = _pending("ImagePullBackOff", "pod demo-train-a: ImagePullBackOff: not found")
    verdict, wait = status.startup_timeout(st, job, [pod], "2026-01-01T00:05:00Z", 900)
    assert verdict is None and wait == 600
    verdict, wait = status.startup_timeout(st, job, [pod], "2026-01-01T00:15:00Z", 900)
    assert wait is None and (verdict.phase, verdict.reason, verdict.stalled) == ("Failed", "ImagePullBackOff", True)
    assert "gave up after 900s" in verdict.message and "ImagePullBackOff: not found" in verdict.message


@pytest.mark.parametrize("reason", ["Unschedulable", "CreateContainerConfigError", "ErrImagePull"])
def test_startup_timeout_reasons(reason):
    job, pod = job_dict("demo-train"), _pod("demo-train-a", "2026-01-01T00:00:00Z")
    verdict, _ = status.startup_timeout(_pending(reason), job, [pod], "2026-01-01T01:00:00Z", 60)
    assert verdict.reason == reason


def test_no_pod_at_all_times_out_from_the_jobs_start():
    job = job_dict("demo-train")
    job["status"]["startTime"] = "2026-01-01T00:00:00Z"
    verdict, _ = status.startup_timeout(_pending("Starting"), job, [], "2026-01-01T00:20:00Z", 900)
    assert verdict.reason == "PodNotCreated" and "kubectl describe job" in verdict.message


@pytest.mark.parametrize("st", [
    _pending("ContainerCreating"),  # a slow pull is progress
    _pending("PodPending"),
    _pending("WaitingForAdmission"),  # Kueue holds it: no pod, no GPU
    {"phase": "Running", "conditions": [{"type": "Ready", "status": "False", "reason": "Running"}]},
])
def test_not_stuck(st):
    job, pod = job_dict("demo-train"), _pod("demo-train-a", "2026-01-01T00:00:00Z")
    assert status.startup_timeout(st, job, [pod], "2026-01-02T00:00:00Z", 60) == (None, None)


def test_lost_job_keeps_a_reported_result_or_fails_without_rerun():
    done = {"jobName": "demo-train", "stage": "done", "adapterUri": "s3://out/adapter"}
    kept = status.lost_job_verdict("FineTuneJob", done)
    assert (kept.phase, kept.reason) == ("Succeeded", "Succeeded") and "s3://out/adapter" in kept.message
    lost = status.lost_job_verdict("FineTuneJob", {"jobName": "demo-train", "stage": "training"})
    assert (lost.phase, lost.reason, lost.stalled) == ("Failed", "JobLost", True)
    assert "not created again" in lost.message
    merged = status.lost_job_verdict("MergeJob", {"jobName": "m-merge", "stage": "done", "mergedUri": "s3://m"})
    assert merged.phase == "Succeeded"


def test_create_refused():
    assert status.create_refused(403, "exceeded quota: count/jobs.batch=0").phase == "Pending"
    assert status.create_refused(403, "x").reason == "CreateFailed" and status.create_refused(403, "x").stalled
    invalid = status.create_refused(422, "spec.template.spec.affinity...: Required value")
    assert (invalid.phase, invalid.reason) == ("Failed", "CreateRejected")
    assert status.create_refused(500, "etcd timeout") is None and status.create_refused(409, "exists") is None


def test_failed_is_final_pending_is_not():
    assert status.is_finished({"phase": "Failed"}) and status.is_finished({"phase": "Succeeded"})
    assert not status.is_finished({"phase": "Pending"}) and not status.is_finished(None)


def test_support_objects_carry_the_uid(ftj_body):
    first, second = ftj_body(), ftj_body()
    second["metadata"]["uid"] = "0f9e8d7c-aaaa-bbbb-cccc-000000000000"
    assert builders.support_name(second) == "demo-train-0f9e8d7c"
    assert builders.support_name(first) != builders.support_name(second)  # a namesake never matches
    assert builders.job_name("FineTuneJob", "demo") == "demo-train"  # the Job keeps the name users look for
    long = ftj_body(name="x" * 63)
    assert len(builders.support_name(long)) <= 63


def _obj(kind: str, name: str, rv: int, uid: str | None = None, owner: str = "FineTuneJob/demo") -> dict:
    return {"kind": kind, "metadata": {"name": name, "namespace": "ns", "uid": uid or name,
                                       "resourceVersion": str(rv), "annotations": {"kubetune.dev/owner": owner}}}


def test_relist_prunes_what_vanished_but_keeps_what_is_newer_than_the_list():
    cache = Cache()
    cache.put(_obj("FineTuneJob", "demo", 10))
    cache.put(_obj("FineTuneJob", "ghost", 11))
    cache.put(_obj("FineTuneJob", "newborn", 30))  # created after the list was taken
    cache.put(_obj("FineTuneJob", "other-ns", 5) | {"metadata": {"name": "x", "namespace": "b", "uid": "x",
                                                                 "resourceVersion": "5"}})
    gone = cache.prune("FineTuneJob", "ns", {"ns/demo"}, 20)
    assert gone == [("FineTuneJob", "ns", "ghost")]
    assert set(cache.keys()) == {("FineTuneJob", "ns", "demo"), ("FineTuneJob", "ns", "newborn"),
                                 ("FineTuneJob", "b", "x")}
    cache.put_child(_obj("Job", "demo-train", 12, uid="job-1"))
    cache.put_child(_obj("Pod", "demo-train-a", 13, uid="pod-1"))
    cache.put_child(_obj("Pod", "demo-train-b", 25, uid="pod-2"))
    assert cache.prune_children("Pod", "ns", set(), 20) == {("FineTuneJob", "ns", "demo")}
    assert [p["metadata"]["name"] for p in cache._pods[("FineTuneJob", "ns", "demo")].values()] == ["demo-train-b"]
    assert cache.prune_children("Job", "ns", {"job-1"}, 20) == set() and cache.job(("FineTuneJob", "ns", "demo"))
    assert cache.prune_children("Job", "ns", set(), 20) == {("FineTuneJob", "ns", "demo")}
    assert cache.job(("FineTuneJob", "ns", "demo")) is None
