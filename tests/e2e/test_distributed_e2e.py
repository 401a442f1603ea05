"""Every GPU a job asks for does work, on the cluster (docs/distributed.md).

* ``gpus: 2``: one pod, two ranks under torchrun (gloo on CPU), on the pod runner and on the real node.
* ``nodes: 2`` (real node only: pods need their own network and cluster DNS): an Indexed Job of two
  pods that meet by pod 0's name under a headless Service (CoreDNS), train together and succeed;
  then the same shape with one pod deleted mid-run: every rank stops at one checkpoint and both
  pods come back and resume from it.

Each adapter loads with ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from e2e_support import System, wait_for
from test_e2e import FTJ, RUN_TIMEOUT, finetune, job_pods, pod_log, wait_phase

pytestmark = pytest.mark.e2e


def load_adapter(system: System, adapter_uri: str, base: Path, into: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    bucket, _, prefix = adapter_uri.removeprefix("s3://").partition("/")
    client = system.s3.client()
    for rel in system.s3_keys(adapter_uri):
        (into / rel).parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, f"{prefix.rstrip('/')}/{rel}", str(into / rel))
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(into))


def succeeded(system: System, name: str) -> dict[str, Any]:
    done = wait_phase(system, FTJ, name, "Succeeded", "Failed", timeout=2 * RUN_TIMEOUT)
    assert done["status"]["phase"] == "Succeeded", f"{done['status']}\n{system.diagnostics()}"
    return done


@pytest.mark.timeout(2 * RUN_TIMEOUT + 300)
def test_two_gpus_run_two_ranks_in_one_pod(system: System, tiny_model_dir: Path, tmp_path: Path) -> None:
    name = "two-ranks"
    manifest = finetune(system, name, max_steps=6, save_steps=3)
    manifest["spec"]["resources"]["gpus"] = 2
    system.cluster.apply(manifest, namespace=system.namespace)
    done = succeeded(system, name)
    assert done["status"]["progress"]["step"] == 6 and done["status"]["attempts"] == 1
    pods = job_pods(system, name)
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    log = pod_log(system, pods[0])
    assert "rank 0 of 2" in log and "rank 1 of 2" in log, log[-3000:]
    job = system.cluster.get(f"/apis/batch/v1/namespaces/{system.namespace}/jobs/{done['status']['jobName']}")
    assert job["spec"].get("completionMode", "NonIndexed") == "NonIndexed"  # one pod: a plain Job
    load_adapter(system, done["status"]["adapterUri"], tiny_model_dir, tmp_path / "adapter")


def two_nodes(system: System, name: str, **training: Any) -> dict[str, Any]:
    manifest = finetune(system, name, **training)
    manifest["spec"]["resources"].update({"gpus": 1, "nodes": 2})
    return manifest


@pytest.mark.realnode
@pytest.mark.timeout(2 * RUN_TIMEOUT + 300)
def test_two_nodes_meet_by_service_name_and_train_together(real_system: System, tiny_model_dir: Path,
                                                           tmp_path: Path) -> None:
    system, name = real_system, "two-nodes"
    system.cluster.apply(two_nodes(system, name, max_steps=6, save_steps=3), namespace=system.namespace)
    done = succeeded(system, name)
    st = done["status"]
    assert st["progress"]["step"] == 6 and st["attempts"] == 1

    job = system.cluster.get(f"/apis/batch/v1/namespaces/{system.namespace}/jobs/{st['jobName']}")
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    service = job["spec"]["template"]["spec"]["subdomain"]
    svc = system.cluster.get(f"/api/v1/namespaces/{system.namespace}/services/{service}")
    assert svc["spec"]["clusterIP"] == "None"  # headless: a DNS name per pod
    assert svc["metadata"]["ownerReferences"][0]["uid"] == done["metadata"]["uid"]

    pods = job_pods(system, name)
    assert sorted(p["spec"]["hostname"] for p in pods) == [f"{st['jobName']}-0", f"{st['jobName']}-1"]
    logs = {p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]: pod_log(system, p)
            for p in pods}
    # pod 0 holds global rank 0 (the rendezvous sorts by the pods' names), pod 1 rank 1; they met by name
    assert "rank 0 of 2" in logs["0"] and "rank 1 of 2" in logs["1"], logs
    assert "done: adapter at" in logs["0"] and "done: adapter at" not in logs["1"]  # one rank publishes
    load_adapter(system, st["adapterUri"], tiny_model_dir, tmp_path / "adapter")


@pytest.mark.realnode
@pytest.mark.timeout(3 * RUN_TIMEOUT + 300)
def test_a_pod_deleted_mid_run_stops_every_rank_at_one_checkpoint_and_both_resume(real_system: System) -> None:
    system, name, total = real_system, "two-nodes-deleted", 40
    system.cluster.apply(two_nodes(system, name, max_steps=total, save_steps=2), namespace=system.namespace)

    def checkpointed() -> dict[str, Any] | None:
        st = (system.resource(FTJ, name) or {}).get("status") or {}
        if st.get("phase") in ("Succeeded", "Failed"):
            raise AssertionError(f"the run ended before a pod could be deleted: {st}")
        return st if st.get("checkpointUri") else None

    wait_for(checkpointed, 2 * RUN_TIMEOUT, "a first checkpoint", interval=0.5)
    first = {p["metadata"]["name"] for p in job_pods(system, name)}
    pod1 = next(p for p in job_pods(system, name)
                if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "1")
    system.cluster.kubectl("delete", "pod", pod1["metadata"]["name"], "-n", system.namespace, "--wait=true",
                           timeout=180)
    done = succeeded(system, name)
    assert done["status"]["progress"]["step"] == total
    later = [p for p in job_pods(system, name) if p["metadata"]["name"] not in first]
    # both indexes ran again (the SIGTERM reached pod 1 only; the ranks agreed to stop, pod 0 too)
    assert sorted(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in later) \
        == ["0", "1"], [p["metadata"]["name"] for p in job_pods(system, name)]
    for pod in later:
        m = re.search(r"resuming from step (\d+)", pod_log(system, pod))
        assert m and int(m.group(1)) >= 2, pod_log(system, pod)[-3000:]
