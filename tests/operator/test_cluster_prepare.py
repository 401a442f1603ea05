"""The CPU prepare stage (issue #18) against a real control plane: a FineTuneJob first runs a
CPU-only prepare Job; only when it completes is the GPU Job created. A failed prepare pod (bad
data, a missing model) fails the FineTuneJob with its reason, and the API server never sees a pod
that asks for a GPU. The tests play kubelet for the pods (``kubelet_run`` / ``kubelet_exit``)."""

from __future__ import annotations

import time

import pytest
from clusterkit import (
    RUNNER,
    create,
    create_s3_secret,
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

SEPARATE = {"mode": "separate", "cpu": "500m", "memory": "1Gi", "nodeSelector": dict(RUNNER)}


def gpu_pods(cluster, ns, name):
    """Pods of this FineTuneJob (any stage) whose container asks for a GPU."""
    items = cluster.request("GET", f"/api/v1/namespaces/{ns}/pods?labelSelector=kubetune.dev%2Fjob-name%3D{name}")
    return [p["metadata"]["name"] for p in items["items"]
            if any("nvidia.com/gpu" in ((c.get("resources") or {}).get("limits") or {})
                   for c in p["spec"]["containers"])]


def test_prepare_job_on_cpu_then_the_gpu_job(cluster, ns, operator_proc):
    create_s3_secret(cluster, ns)
    create(cluster, ns, "FineTuneJob", "two", ftj_spec(prepare=SEPARATE))
    prep = wait_for(lambda: job(cluster, ns, "two-prepare"), 60, "Job two-prepare")
    assert prep["metadata"]["labels"]["kubetune.dev/stage"] == "prepare"
    assert "kueue.x-k8s.io/queue-name" not in prep["metadata"]["labels"] and not prep["spec"].get("suspend")
    pod_spec = prep["spec"]["template"]["spec"]
    (container,) = pod_spec["containers"]
    assert container["command"][:2] == ["kubetune", "prepare"]
    assert container["resources"] == {"limits": {"cpu": "500m", "memory": "1Gi"},
                                      "requests": {"cpu": "500m", "memory": "1Gi"}}
    assert job(cluster, ns, "two-train") is None

    pod = wait_pod(cluster, ns, "two-prepare")
    kubelet_run(cluster, pod)
    st = wait_status(cluster, ns, "FineTuneJob", "two", lambda s: ready(s).get("reason") == "Preparing", 30)
    assert st["phase"] == "Pending" and st["prepareJobName"] == "two-prepare" and "jobName" not in st
    assert "preparing the data on CPU" in st["message"]
    assert job(cluster, ns, "two-train") is None and not gpu_pods(cluster, ns, "two")

    kubelet_exit(cluster, pod, 0, term_message("Prepared", "data prepared",
                                               data={"trainingRows": 40, "preparedUri": "s3://out/.kubetune/x"}))
    train = wait_for(lambda: job(cluster, ns, "two-train"), 60, "the GPU Job after the prepare stage")
    (gpu,) = train["spec"]["template"]["spec"]["containers"]
    assert gpu["command"][:2] == ["kubetune", "train"] and gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    kubelet_run(cluster, wait_pod(cluster, ns, "two-train"))
    st = wait_status(cluster, ns, "FineTuneJob", "two", phase_is("Running"), 30)
    assert st["jobName"] == "two-train" and st["prepareJobName"] == "two-prepare" and st["attempts"] == 1


@pytest.mark.parametrize("reason,code,message", [
    ("InvalidDataset", 3, "row 6 has no 'answer' (template field {answer}); fix or remove the row"),
    ("InvalidSpec", 2, "spec.model.uri s3://models/none: the model folder is empty or does not exist"),
])
def test_a_failed_prepare_stage_fails_the_job_without_a_gpu_pod(cluster, ns, operator_proc, reason, code, message):
    create_s3_secret(cluster, ns)
    name = f"bad-{code}"
    create(cluster, ns, "FineTuneJob", name, ftj_spec(prepare=SEPARATE))
    pod = wait_pod(cluster, ns, f"{name}-prepare")
    kubelet_run(cluster, pod)
    kubelet_exit(cluster, pod, code, term_message(reason, message))
    st = wait_status(cluster, ns, "FineTuneJob", name, phase_is("Failed"), 60)
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == reason and message in failed["message"], failed
    assert "no GPU pod was created" in failed["message"]
    time.sleep(3)  # a GPU Job would be created at once: none comes
    assert job(cluster, ns, f"{name}-train") is None and not gpu_pods(cluster, ns, name)
    assert "jobName" not in st and st["prepareJobName"] == f"{name}-prepare"


def test_a_prepare_job_deleted_before_the_gpu_job_is_made_again(cluster, ns, operator_proc):
    """Preparing holds no GPU and is idempotent (content-addressed): a prepare Job lost before the GPU
    Job exists is simply created again, unlike the GPU Job, which is never created twice."""
    create_s3_secret(cluster, ns)
    create(cluster, ns, "FineTuneJob", "again", ftj_spec(prepare=SEPARATE))
    first = wait_for(lambda: job(cluster, ns, "again-prepare"), 60, "Job again-prepare")
    cluster.request("DELETE", f"/apis/batch/v1/namespaces/{ns}/jobs/again-prepare",
                    {"propagationPolicy": "Background"})
    second = wait_for(lambda: (j := job(cluster, ns, "again-prepare")) and
                      j["metadata"]["uid"] != first["metadata"]["uid"] and j, 60, "a new Job again-prepare")
    pod = wait_for(lambda: next((p for p in pods(cluster, ns, "again-prepare") if p["spec"].get("nodeName") and
                                 p["metadata"]["labels"]["batch.kubernetes.io/controller-uid"]
                                 == second["metadata"]["uid"]), None), 60, "the new prepare Job's pod")
    kubelet_exit(cluster, pod, 0, term_message("Prepared", "data prepared"))
    wait_for(lambda: job(cluster, ns, "again-train"), 60, "the GPU Job")
