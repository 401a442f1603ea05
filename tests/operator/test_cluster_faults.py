"""The operator under faults, against the real control plane (docs/operator.md, "Under faults").

Each test injects one fault -- a Job TTL-deleted at 0 s or while the operator is down, a resource
deleted and re-created under its name, a support object deleted, a watch gap across an API server
restart, a create refused by quota or as invalid, a pod stuck in ImagePullBackOff -- and counts
what was lost or duplicated: Jobs created (from the API server's audit log, which records every
request the operator's ServiceAccount makes), statuses, pods.
"""

from __future__ import annotations

import time
import urllib.request
from typing import Any
from urllib.parse import unquote

import pytest
from clusterkit import (
    GROUP,
    OPERATOR_USER,
    OperatorProcess,
    create,
    create_s3_secret,
    force_delete,
    free_port,
    ftj_spec,
    get,
    job,
    kubelet_exit,
    kubelet_run,
    now,
    phase_is,
    ready,
    support_name,
    term_message,
    wait_for,
    wait_pod,
    wait_status,
)

pytestmark = pytest.mark.integration


def _creates(cluster: Any, ns: str, plural: str, name: str | None = None) -> list[dict[str, Any]]:
    """The operator's successful POSTs of ``plural`` in ``ns`` (optionally of one object name)."""
    out = []
    for ev in cluster.audit_events(OPERATOR_USER):
        ref = ev.get("objectRef") or {}
        if ev["verb"] == "create" and ref.get("resource") == plural and ref.get("namespace") == ns \
                and ev["responseStatus"].get("code") == 201 and (name is None or ref.get("name") == name):
            out.append(ev)
    return out


def _delete(cluster: Any, path: str, policy: str = "Background") -> None:
    cluster.request("DELETE", path, {"propagationPolicy": policy}, ok404=True)


def _running(cluster: Any, ns: str, name: str) -> dict[str, Any]:
    wait_for(lambda: job(cluster, ns, f"{name}-train"), 60, f"Job {name}-train")
    pod = wait_pod(cluster, ns, f"{name}-train")
    kubelet_run(cluster, pod)
    wait_status(cluster, ns, "FineTuneJob", name, phase_is("Running"), 30)
    return pod



def _metric(port: int, line_start: str) -> float | None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return None


# ---------------------------------------------------------------------------------------------- TTL


def test_ttl_zero_is_set_only_after_the_end_is_recorded_and_never_reruns(cluster, ns, operator_proc):
    create_s3_secret(cluster, ns)
    create(cluster, ns, "FineTuneJob", "ttl0", ftj_spec(ttlSecondsAfterFinished=0))
    pod = _running(cluster, ns, "ttl0")
    assert "ttlSecondsAfterFinished" not in job(cluster, ns, "ttl0-train")["spec"]  # not while it runs
    kubelet_exit(cluster, pod, 0, term_message("Completed", "ok", adapterUri="s3://out/ttl0/adapter"))
    st = wait_status(cluster, ns, "FineTuneJob", "ttl0", phase_is("Succeeded"), 60)
    assert st["adapterUri"] == "s3://out/ttl0/adapter"
    wait_for(lambda: job(cluster, ns, "ttl0-train") is None, 60, "the TTL controller deleted the Job")
    time.sleep(5)  # room for a wrong re-create
    assert job(cluster, ns, "ttl0-train") is None
    assert len(_creates(cluster, ns, "jobs", "ttl0-train")) == 1
    assert get(cluster, ns, "FineTuneJob", "ttl0")["status"]["phase"] == "Succeeded"


def test_job_deleted_while_the_operator_is_down_is_never_created_again(cluster, ns, operator_proc):
    create_s3_secret(cluster, ns)
    for name in ("kept", "lost"):
        create(cluster, ns, "FineTuneJob", name, ftj_spec(ttlSecondsAfterFinished=0))
    kept_pod, lost_pod = _running(cluster, ns, "kept"), _running(cluster, ns, "lost")
    operator_proc.kill()
    # "kept": the pod reported its result through the progress channel, ended, and its Job went
    # (the TTL fired while the operator was down); "lost": the Job was deleted mid-run
    cluster.request("PATCH", f"{GROUP}/namespaces/{ns}/finetunejobs/kept/status",
                    {"status": {"stage": "done", "adapterUri": "s3://out/kept/adapter"}},
                    content_type="application/merge-patch+json")
    kubelet_exit(cluster, kept_pod, 0, term_message("Completed", "ok", adapterUri="s3://out/kept/adapter"))
    for name, pod in (("kept", kept_pod), ("lost", lost_pod)):
        _delete(cluster, f"/apis/batch/v1/namespaces/{ns}/jobs/{name}-train")
        force_delete(cluster, pod)
        wait_for(lambda n=name: job(cluster, ns, f"{n}-train") is None, 30, f"Job {name}-train deleted")
    operator_proc.start()
    kept = wait_status(cluster, ns, "FineTuneJob", "kept", phase_is("Succeeded"), 60)
    assert "its pod had reported success" in kept["message"] and kept["adapterUri"] == "s3://out/kept/adapter"
    lost = wait_status(cluster, ns, "FineTuneJob", "lost", phase_is("Failed", "JobLost"), 60)
    assert "not created again" in lost["message"]
    time.sleep(5)
    for name in ("kept", "lost"):
        assert job(cluster, ns, f"{name}-train") is None
        assert len(_creates(cluster, ns, "jobs", f"{name}-train")) == 1, name


def test_terminal_phase_is_final_in_the_crd(cluster, ns):
    create(cluster, ns, "FineTuneJob", "final", ftj_spec())
    path = f"{GROUP}/namespaces/{ns}/finetunejobs/final/status"
    merge = "application/merge-patch+json"
    cluster.request("PATCH", path, {"status": {"phase": "Failed", "message": "x"}}, content_type=merge)
    with pytest.raises(Exception, match="status.phase is final once Succeeded or Failed"):
        cluster.request("PATCH", path, {"status": {"phase": "Running"}}, content_type=merge)
    cluster.request("PATCH", path, {"status": {"message": "y", "observedGeneration": 2}}, content_type=merge)


# ---------------------------------------------------------------------------------------------- namesakes


def test_a_namesake_never_adopts_the_children_of_the_deleted_resource(cluster, ns, operator_proc):
    create_s3_secret(cluster, ns)
    first = create(cluster, ns, "FineTuneJob", "twin", ftj_spec())
    old_pod = _running(cluster, ns, "twin")
    old_support = support_name(cluster, ns, "FineTuneJob", "twin")
    # what `kubectl replace --force` / delete-then-apply does: delete, create at once
    _delete(cluster, f"{GROUP}/namespaces/{ns}/finetunejobs/twin")
    force_delete(cluster, old_pod)
    second = create(cluster, ns, "FineTuneJob", "twin", ftj_spec())
    assert second["metadata"]["uid"] != first["metadata"]["uid"]
    new_support = support_name(cluster, ns, "FineTuneJob", "twin")
    assert new_support != old_support
    owned = wait_for(lambda: (j := job(cluster, ns, "twin-train")) and j["metadata"]["ownerReferences"][0]["uid"]
                     == second["metadata"]["uid"] and j, 90, "the namesake's own Job")
    assert owned["spec"]["template"]["spec"]["serviceAccountName"] == new_support
    pod = wait_pod(cluster, ns, "twin-train")  # the pod exists: its ServiceAccount does
    assert pod["metadata"]["labels"]["batch.kubernetes.io/controller-uid"] == owned["metadata"]["uid"]
    for plural in ("configmaps", "serviceaccounts"):
        obj = cluster.request("GET", f"/api/v1/namespaces/{ns}/{plural}/{new_support}")
        assert obj["metadata"]["ownerReferences"][0]["uid"] == second["metadata"]["uid"]
        wait_for(lambda p=plural: cluster.request("GET", f"/api/v1/namespaces/{ns}/{p}/{old_support}",
                                                  ok404=True) is None, 60, f"the old {plural} collected")
    kubelet_run(cluster, pod)
    wait_status(cluster, ns, "FineTuneJob", "twin", phase_is("Running"), 30)


def test_a_deleted_support_object_is_recreated(cluster, ns, operator_proc):
    create_s3_secret(cluster, ns)
    create(cluster, ns, "FineTuneJob", "fix", ftj_spec())
    pod = wait_pod(cluster, ns, "fix-train")
    support = support_name(cluster, ns, "FineTuneJob", "fix")
    cluster.request("DELETE", f"/api/v1/namespaces/{ns}/serviceaccounts/{support}")
    kubelet_run(cluster, pod)
    kubelet_exit(cluster, pod, 1, "RuntimeError: transient")  # the retry's pod needs the ServiceAccount
    wait_for(lambda: cluster.request("GET", f"/api/v1/namespaces/{ns}/serviceaccounts/{support}", ok404=True),
             120, "the ServiceAccount re-created by the operator")
    replacement = wait_for(lambda: next((p for p in cluster.request(
        "GET", f"/api/v1/namespaces/{ns}/pods?labelSelector=job-name%3Dfix-train")["items"]
        if p["metadata"]["uid"] != pod["metadata"]["uid"]), None), 120, "a new pod")
    assert replacement["spec"]["serviceAccountName"] == support
    events = cluster.request("GET", f"/api/v1/namespaces/{ns}/events")["items"]
    recreated = [e for e in events if e["reason"] == "ChildRecreated"]
    assert recreated and "ServiceAccount" in recreated[0]["message"]
    assert recreated[0]["source"]["component"] == "kubetune-operator"  # not "kopf"


# ---------------------------------------------------------------------------------------------- watches


def test_watches_are_filtered_server_side(cluster, ns, operator_proc):
    for i in range(3):  # pods that are none of kubetune's business
        cluster.request("POST", f"/api/v1/namespaces/{ns}/pods", {
            "metadata": {"name": f"foreign-{i}"},
            "spec": {"nodeName": "cpu-node-1", "containers": [{"name": "c", "image": "busybox"}]}})
    create_s3_secret(cluster, ns)
    create(cluster, ns, "FineTuneJob", "filtered", ftj_spec())
    wait_pod(cluster, ns, "filtered-train")
    reads = [ev["requestURI"] for ev in cluster.audit_events(OPERATOR_USER)
             if ev["verb"] in ("list", "watch") and (ev.get("objectRef") or {}).get("resource") in ("pods", "jobs")
             and (ev.get("objectRef") or {}).get("namespace") == ns]
    assert reads, "the operator lists/watches pods and Jobs"
    unfiltered = [uri for uri in reads if "labelSelector=kubetune.dev/kind" not in unquote(uri)]
    assert not unfiltered, unfiltered


def test_a_watch_gap_leaves_no_ghost(cluster, ns, operator_identity, tmp_path):
    """Frozen operator, objects deleted meanwhile, API server restarted (every watch breaks and its
    resourceVersion is too old for the new watch cache: kopf relists without DELETED events)."""
    port = free_port()
    op = OperatorProcess(operator_identity["kubeconfig"], [ns], tmp_path / "operator.log",
                         extra=["--resync-seconds", "5", "--metrics-port", str(port)]).start()
    try:
        create_s3_secret(cluster, ns)
        for name in ("ghost", "orphan"):
            create(cluster, ns, "FineTuneJob", name, ftj_spec())
        _running(cluster, ns, "ghost")
        orphan_pod = _running(cluster, ns, "orphan")
        running = 'kubetune_jobs{kind="FineTuneJob",phase="Running"}'
        wait_for(lambda: _metric(port, running) == 2, 30, "both counted as Running")
        op.proc.send_signal(19)  # SIGSTOP
        _delete(cluster, f"{GROUP}/namespaces/{ns}/finetunejobs/ghost")
        _delete(cluster, f"/apis/batch/v1/namespaces/{ns}/jobs/orphan-train")
        force_delete(cluster, orphan_pod)
        wait_for(lambda: job(cluster, ns, "orphan-train") is None, 30, "Job orphan-train deleted")
        cluster.restart_apiserver(down_seconds=1)
        op.proc.send_signal(18)  # SIGCONT
        st = wait_status(cluster, ns, "FineTuneJob", "orphan", phase_is("Failed", "JobLost"), 60)
        assert st["jobName"] == "orphan-train"
        wait_for(lambda: _metric(port, running) in (0, None), 30, "the deleted resource forgotten")
        time.sleep(6)  # a resync later: nothing for the ghost any more
        since = now()
        time.sleep(6)
        ghost_calls = [ev for ev in cluster.audit_events(OPERATOR_USER)
                       if "ghost" in ev["requestURI"] and ev["stageTimestamp"] >= since]
        assert ghost_calls == []
        assert len(_creates(cluster, ns, "jobs", "orphan-train")) == 1
        assert op.proc.poll() is None, op.logs()[-3000:]
    finally:
        op.stop()


# ---------------------------------------------------------------------------------------------- creates


def test_a_create_refused_by_quota_shows_then_recovers(cluster, ns, operator_proc):
    create_s3_secret(cluster, ns)
    cluster.request("POST", f"/api/v1/namespaces/{ns}/resourcequotas", {
        "metadata": {"name": "no-jobs"}, "spec": {"hard": {"count/jobs.batch": "0"}}})
    wait_for(lambda: (cluster.request("GET", f"/api/v1/namespaces/{ns}/resourcequotas/no-jobs").get("status")
                      or {}).get("hard"), 30, "the quota's status")
    create(cluster, ns, "FineTuneJob", "quota", ftj_spec())
    st = wait_status(cluster, ns, "FineTuneJob", "quota", phase_is("Pending", "CreateFailed"), 30)
    assert "exceeded quota" in st["message"] and ready(st)["status"] == "False"
    assert {c["type"]: c["status"] for c in st["conditions"]}["Stalled"] == "True"
    events = cluster.request("GET", f"/api/v1/namespaces/{ns}/events")["items"]
    assert any(e["reason"] == "CreateFailed" and e["type"] == "Warning" and "exceeded quota" in e["message"]
               for e in events)
    cluster.request("DELETE", f"/api/v1/namespaces/{ns}/resourcequotas/no-jobs")
    wait_for(lambda: job(cluster, ns, "quota-train"), 90, "the Job once the quota is gone")


def test_an_invalid_child_fails_at_once_without_retrying(cluster, ns, operator_proc):
    create_s3_secret(cluster, ns)
    bad_affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}}
    spec = ftj_spec()
    spec["resources"] = {**spec["resources"], "affinity": bad_affinity}
    create(cluster, ns, "FineTuneJob", "badaff", spec)
    st = wait_status(cluster, ns, "FineTuneJob", "badaff", phase_is("Failed", "CreateRejected"), 30)
    assert "nodeSelectorTerms" in st["message"]
    time.sleep(12)  # two backoff periods: no retry of what cannot succeed
    attempts = [ev for ev in cluster.audit_events(OPERATOR_USER) if ev["verb"] == "create"
                and (ev.get("objectRef") or {}).get("resource") == "jobs"
                and (ev.get("objectRef") or {}).get("namespace") == ns]
    assert len(attempts) == 1 and attempts[0]["responseStatus"]["code"] == 422


# ---------------------------------------------------------------------------------------------- stuck pods


def test_a_pod_stuck_in_image_pull_backoff_fails_the_job_and_frees_the_gpu(cluster, ns, operator_proc):
    create_s3_secret(cluster, ns)
    create(cluster, ns, "FineTuneJob", "stuck", ftj_spec(startupTimeoutSeconds=30))
    pod = wait_pod(cluster, ns, "stuck-train")
    name = pod["spec"]["containers"][0]["name"]
    cluster.request("PATCH", f"/api/v1/namespaces/{ns}/pods/{pod['metadata']['name']}/status", {"status": {
        "phase": "Pending", "containerStatuses": [{
            "name": name, "ready": False, "restartCount": 0, "image": "kubetune/trainer:test", "imageID": "",
            "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}}}]}},
        content_type="application/merge-patch+json")
    wait_status(cluster, ns, "FineTuneJob", "stuck", phase_is("Pending", "ImagePullBackOff"), 30)
    st = wait_status(cluster, ns, "FineTuneJob", "stuck", phase_is("Failed", "ImagePullBackOff"), 90)
    assert "gave up after 30s" in st["message"]
    j = wait_for(lambda: (j := job(cluster, ns, "stuck-train")) and any(
        c["type"] in ("FailureTarget", "Failed") and c["status"] == "True"
        for c in (j.get("status") or {}).get("conditions") or []) and j, 60, "the Job stopped")
    assert j["spec"]["activeDeadlineSeconds"] == 1
    wait_for(lambda: cluster.request("GET", f"/api/v1/namespaces/{ns}/pods/{pod['metadata']['name']}",
                                     ok404=True) is None or cluster.request(
        "GET", f"/api/v1/namespaces/{ns}/pods/{pod['metadata']['name']}")["metadata"].get("deletionTimestamp"),
             30, "the pod deleted (its GPU freed)")
    time.sleep(3)
    assert get(cluster, ns, "FineTuneJob", "stuck")["status"]["phase"] == "Failed"  # not overwritten
