"""The operator against a real control plane, running as its ServiceAccount with only the chart's RBAC.

Each test gets a fresh namespace and its own ``kubetune operator --namespace <ns>`` subprocess.
Pods are pinned to ``runner-node``; the tests play kubelet (patch pod status) to make them run,
succeed or fail.
"""

from __future__ import annotations

import json
import time

import pytest
from clusterkit import (
    create,
    create_s3_secret,
    force_delete,
    ftj_spec,
    get,
    job,
    kubelet_exit,
    kubelet_run,
    phase_is,
    pods,
    ready,
    support_name,
    term_message,
    wait_for,
    wait_pod,
    wait_status,
)

pytestmark = pytest.mark.integration


def _conds(st):
    return {c["type"]: c["status"] for c in st.get("conditions") or []}


def test_apply_runs_succeeds_with_results(cluster, ns, operator_proc, operator_identity):
    create_s3_secret(cluster, ns)
    create(cluster, ns, "FineTuneJob", "demo", ftj_spec())
    j = wait_for(lambda: job(cluster, ns, "demo-train"), 60, "Job demo-train")
    owner = j["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("FineTuneJob", "demo", True)
    pod_spec = j["spec"]["template"]["spec"]
    assert pod_spec["securityContext"]["runAsNonRoot"] is True
    support = support_name(cluster, ns, "FineTuneJob", "demo")
    assert pod_spec["serviceAccountName"] == support
    (container,) = pod_spec["containers"]
    assert container["image"] == "kubetune/trainer:test"
    env = {e["name"]: e for e in container["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "s3-creds",
                                                                         "key": "AWS_SECRET_ACCESS_KEY"}
    cm = cluster.request("GET", f"/api/v1/namespaces/{ns}/configmaps/{support}")
    assert json.loads(cm["data"]["spec.json"])["output"]["uri"] == "s3://out/run-1"
    assert "test-secret-value" not in json.dumps(cm) + json.dumps(j)

    pod = wait_pod(cluster, ns, "demo-train")
    assert pod["spec"]["nodeName"] == "runner-node"
    kubelet_run(cluster, pod)
    st = wait_status(cluster, ns, "FineTuneJob", "demo", phase_is("Running"), 30)
    assert _conds(st) == {"Ready": "False", "Reconciling": "True"}
    assert st["jobName"] == "demo-train" and st["attempts"] == 1 and st["observedGeneration"] == 1

    # the progress channel: the pod's own ServiceAccount may patch this resource's status, nothing else
    token = cluster.create_token(ns, support)
    cluster.request("PATCH", f"/apis/kubetune.dev/v1alpha1/namespaces/{ns}/finetunejobs/demo/status",
                    {"status": {"progress": {"step": 3, "totalSteps": 10, "percent": 30, "loss": 2.5}}},
                    token=token, content_type="application/merge-patch+json")
    for forbidden in (f"/api/v1/namespaces/{ns}/secrets/s3-creds",
                      f"/apis/kubetune.dev/v1alpha1/namespaces/{ns}/finetunejobs"):
        with pytest.raises(Exception, match="403"):
            cluster.request("GET", forbidden, token=token)

    table = cluster.kubectl("get", "ftj", "-n", ns).stdout
    header, row = table.splitlines()[:2]
    assert header.split() == ["NAME", "PHASE", "MODEL", "PROGRESS", "LOSS", "ETA", "STAGE", "AGE"]
    assert row.split()[:5] == ["demo", "Running", "s3://models/tiny", "30", "2.5"]  # Model: spec.model.uri

    kubelet_exit(cluster, pod, 0, term_message("Completed", "trained 10 steps", adapterUri="s3://out/run-1/adapter",
                                               reportUri="s3://out/run-1/report.md",
                                               progress={"step": 10, "totalSteps": 10, "percent": 100}))
    st = wait_status(cluster, ns, "FineTuneJob", "demo", phase_is("Succeeded"), 60)
    assert _conds(st) == {"Ready": "True", "Succeeded": "True"}
    assert st["adapterUri"] == "s3://out/run-1/adapter" and st["reportUri"] == "s3://out/run-1/report.md"
    assert st["progress"]["percent"] == 100 and st["completionTime"] and st["message"] == "trained 10 steps"
    events = cluster.request("GET", f"/api/v1/namespaces/{ns}/events")["items"]
    reasons = {e["reason"] for e in events if e["involvedObject"].get("name") == "demo"}
    assert {"JobCreated", "Succeeded"} <= reasons, reasons
    assert "Forbidden" not in operator_proc.logs(), operator_proc.logs()[-3000:]  # the chart RBAC suffices


def test_missing_secret_waits_without_pod_then_recovers(cluster, ns, operator_proc):
    create(cluster, ns, "FineTuneJob", "nosecret", ftj_spec())
    # Pending (never Failed: Failed is final), Stalled says what is missing
    st = wait_status(cluster, ns, "FineTuneJob", "nosecret", phase_is("Pending", "SecretNotFound"), 30)
    assert _conds(st)["Stalled"] == "True" and "s3-creds" in st["message"]
    time.sleep(3)
    assert job(cluster, ns, "nosecret-train") is None and pods(cluster, ns, "nosecret-train") == []
    create_s3_secret(cluster, ns)  # the re-check (with backoff) picks it up
    wait_for(lambda: job(cluster, ns, "nosecret-train"), 60, "Job after the Secret appeared")
    wait_status(cluster, ns, "FineTuneJob", "nosecret", lambda s: s.get("phase") == "Pending", 30)


def test_no_gpu_node_is_unschedulable(cluster, ns, operator_proc):
    create_s3_secret(cluster, ns)
    create(cluster, ns, "FineTuneJob", "huge", ftj_spec(resources={"gpus": 16}))
    st = wait_status(cluster, ns, "FineTuneJob", "huge", phase_is("Pending", "Unschedulable"), 60)
    assert "nvidia.com/gpu" in st["message"]


def test_failures_retry_then_backoff_limit(cluster, ns, operator_proc):
    create_s3_secret(cluster, ns)
    create(cluster, ns, "FineTuneJob", "flaky", ftj_spec(backoffLimit=1))
    wait_for(lambda: job(cluster, ns, "flaky-train"), 60, "Job")
    first = wait_pod(cluster, ns, "flaky-train")
    kubelet_run(cluster, first)
    kubelet_exit(cluster, first, 1, "Traceback (most recent call last):\nRuntimeError: CUDA error 1")
    second = wait_pod(cluster, ns, "flaky-train", count=2)
    kubelet_run(cluster, second)
    wait_status(cluster, ns, "FineTuneJob", "flaky", lambda s: s.get("attempts") == 2 and s["phase"] == "Running", 30)
    kubelet_exit(cluster, second, 1, "RuntimeError: CUDA error 2")
    st = wait_status(cluster, ns, "FineTuneJob", "flaky", phase_is("Failed", "BackoffLimitExceeded"), 60)
    assert "CUDA error 2" in st["message"] and st["attempts"] == 2
    assert _conds(st) == {"Ready": "False", "Stalled": "True", "Failed": "True"}


def test_permanent_exit_code_fails_at_once(cluster, ns, operator_proc):
    create_s3_secret(cluster, ns)
    create(cluster, ns, "FineTuneJob", "baddata", ftj_spec(backoffLimit=3))
    wait_for(lambda: job(cluster, ns, "baddata-train"), 60, "Job")
    pod = wait_pod(cluster, ns, "baddata-train")
    kubelet_run(cluster, pod)
    kubelet_exit(cluster, pod, 3, term_message("InvalidDataset", "column 'text' not found in s3://data/train.jsonl"))
    st = wait_status(cluster, ns, "FineTuneJob", "baddata", phase_is("Failed", "InvalidDataset"), 60)
    assert st["message"] == "column 'text' not found in s3://data/train.jsonl"
    assert len(pods(cluster, ns, "baddata-train")) == 1  # no retry of a permanent failure


def test_suspend_and_resume(cluster, ns, operator_proc):
    create_s3_secret(cluster, ns)
    create(cluster, ns, "FineTuneJob", "pausable", ftj_spec())
    wait_for(lambda: job(cluster, ns, "pausable-train"), 60, "Job")
    pod = wait_pod(cluster, ns, "pausable-train")
    kubelet_run(cluster, pod)
    wait_status(cluster, ns, "FineTuneJob", "pausable", phase_is("Running"), 30)
    cluster.request("PATCH", f"/apis/kubetune.dev/v1alpha1/namespaces/{ns}/finetunejobs/pausable",
                    {"spec": {"suspend": True}}, content_type="application/merge-patch+json")
    wait_for(lambda: job(cluster, ns, "pausable-train")["spec"]["suspend"], 30, "Job suspended")
    # the Job controller deletes the pod; the trainer would checkpoint and exit 7: play the kubelet
    wait_for(lambda: pods(cluster, ns, "pausable-train")[0]["metadata"].get("deletionTimestamp"), 30,
             "pod terminating")
    kubelet_exit(cluster, pod, 7, term_message("Preempted", "stopped after checkpoint step 4",
                                               checkpointUri="s3://out/run-1/checkpoints/step-4"))
    force_delete(cluster, pod)
    st = wait_status(cluster, ns, "FineTuneJob", "pausable", phase_is("Suspended"), 30)
    assert _conds(st)["Suspended"] == "True"
    cluster.request("PATCH", f"/apis/kubetune.dev/v1alpha1/namespaces/{ns}/finetunejobs/pausable",
                    {"spec": {"suspend": False}}, content_type="application/merge-patch+json")
    wait_for(lambda: not job(cluster, ns, "pausable-train")["spec"]["suspend"], 30, "Job resumed")
    second = wait_for(lambda: next((p for p in pods(cluster, ns, "pausable-train") if p["spec"].get("nodeName")
                                    and p["metadata"]["name"] != pod["metadata"]["name"]), None), 60, "new pod")
    kubelet_run(cluster, second)
    wait_status(cluster, ns, "FineTuneJob", "pausable", phase_is("Running"), 30)


def test_active_deadline_exceeded(cluster, ns, operator_proc):
    create_s3_secret(cluster, ns)
    create(cluster, ns, "FineTuneJob", "slow", ftj_spec(activeDeadlineSeconds=3))
    wait_for(lambda: job(cluster, ns, "slow-train"), 60, "Job")
    kubelet_run(cluster, wait_pod(cluster, ns, "slow-train"))
    st = wait_status(cluster, ns, "FineTuneJob", "slow", phase_is("Failed", "DeadlineExceeded"), 60)
    assert "activeDeadlineSeconds=3" in st["message"]


def test_delete_cascades_to_every_child(cluster, ns, operator_proc):
    create_s3_secret(cluster, ns)
    create(cluster, ns, "FineTuneJob", "gone", ftj_spec())
    wait_for(lambda: job(cluster, ns, "gone-train"), 60, "Job")
    support = support_name(cluster, ns, "FineTuneJob", "gone")
    children = [f"/api/v1/namespaces/{ns}/configmaps/{support}",
                f"/api/v1/namespaces/{ns}/serviceaccounts/{support}",
                f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles/{support}",
                f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings/{support}",
                f"/apis/batch/v1/namespaces/{ns}/jobs/gone-train"]
    for path in children:
        assert cluster.request("GET", path, ok404=True) is not None, path
    cluster.request("DELETE", f"/apis/kubetune.dev/v1alpha1/namespaces/{ns}/finetunejobs/gone")
    for path in children:
        wait_for(lambda p=path: cluster.request("GET", p, ok404=True) is None, 60, f"{path} garbage-collected")


def test_operator_restart_keeps_one_job_and_recomputes_status(cluster, ns, operator_proc):
    create_s3_secret(cluster, ns)
    create(cluster, ns, "FineTuneJob", "durable", ftj_spec())
    wait_for(lambda: job(cluster, ns, "durable-train"), 60, "Job")
    pod = wait_pod(cluster, ns, "durable-train")
    kubelet_run(cluster, pod)
    before = wait_status(cluster, ns, "FineTuneJob", "durable", phase_is("Running"), 30)
    uid = job(cluster, ns, "durable-train")["metadata"]["uid"]

    operator_proc.kill()  # SIGKILL mid-run
    operator_proc.start()
    time.sleep(5)
    after = get(cluster, ns, "FineTuneJob", "durable")["status"]
    assert after["conditions"] == before["conditions"]  # same status, same transition times
    assert job(cluster, ns, "durable-train")["metadata"]["uid"] == uid
    jobs = cluster.request("GET", f"/apis/batch/v1/namespaces/{ns}/jobs")["items"]
    assert [j["metadata"]["name"] for j in jobs] == ["durable-train"]

    operator_proc.kill()  # the pod finishes while no operator runs
    kubelet_exit(cluster, pod, 0, term_message("Completed", "done", adapterUri="s3://out/run-1/adapter"))
    operator_proc.start()
    st = wait_status(cluster, ns, "FineTuneJob", "durable", phase_is("Succeeded"), 60)
    assert st["adapterUri"] == "s3://out/run-1/adapter"
    assert ready(st)["status"] == "True"
