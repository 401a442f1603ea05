"""The prepare stage's pure parts (issue #18): the CPU Job's manifest, the status while it runs or
after it failed, and the cache keeping a FineTuneJob's two Jobs apart."""

from __future__ import annotations

from typing import Any

from kobjects import jcond, job_dict, pod_dict, term_msg
from kubetune_operator import builders, status
from kubetune_operator.cache import PREPARE, TRAIN, Cache

from kubetune import api

SETTINGS = builders.Settings(trainer_image="kubetune/trainer:test")


def separate(ftj_body: Any, **prepare: Any) -> tuple[dict[str, Any], api.FineTuneJobSpec]:
    body = ftj_body(prepare={"mode": "separate", **prepare},
                    resources={"gpus": 2, "nodeSelector": {"pool": "h100"},
                               "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]},
                    queueName="gpu-queue", workloadPriorityClassName="high")
    return body, api.FineTuneJobSpec.model_validate(body["spec"])


def test_separate_is_the_default_and_inline_opts_out() -> None:
    doc = {"model": {"uri": "s3://models/x"}, "dataset": {"source": "jsonl", "uri": "s3://data/x.jsonl"},
           "training": {"maxSteps": 1}, "output": {"uri": "s3://out/x"}}
    assert builders.prepares(api.FineTuneJobSpec.model_validate(doc))
    assert not builders.prepares(api.FineTuneJobSpec.model_validate({**doc, "prepare": {"mode": "inline"}}))
    assert not builders.prepares(api.MergeJobSpec.model_validate(
        {"source": {"adapterUri": "s3://ada/b", "baseModel": {"uri": "s3://models/x"}}, "output": {"uri": "s3://out/m"}}))


def test_prepare_job_asks_for_no_gpu_and_is_never_queued(ftj_body: Any) -> None:
    body, spec = separate(ftj_body, cpu="2", memory="8Gi", nodeSelector={"pool": "cpu"})
    manifest = builders.prepare_job(body, spec, SETTINGS)
    meta, pod = manifest["metadata"], manifest["spec"]["template"]
    assert meta["name"] == "demo-prepare" and meta["labels"]["kubetune.dev/stage"] == "prepare"
    assert pod["metadata"]["labels"]["kubetune.dev/stage"] == "prepare"
    assert not any(k.startswith("kueue.x-k8s.io/") for k in meta["labels"]) and manifest["spec"]["suspend"] is False
    (container,) = pod["spec"]["containers"]
    assert container["command"] == ["kubetune", "prepare", "--spec", "/etc/kubetune/spec.json"]
    cpu = {"cpu": "2", "memory": "8Gi"}
    assert container["resources"] == {"limits": cpu, "requests": cpu}
    assert pod["spec"]["nodeSelector"] == {"pool": "cpu"} and "tolerations" not in pod["spec"]
    env = {e["name"] for e in container["env"]}
    assert "KUBETUNE_NPROC_PER_NODE" not in env  # one process: no torchrun
    assert manifest["spec"]["parallelism"] == 1 and "completionMode" not in manifest["spec"]
    inherited = builders.prepare_job(*separate(ftj_body), SETTINGS)["spec"]["template"]["spec"]
    assert inherited["nodeSelector"] == {"pool": "h100"}  # no placement of its own: the GPU pod's
    assert inherited["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists"}]
    assert "nvidia.com/gpu" not in inherited["containers"][0]["resources"]["limits"]
    # the same pod otherwise: spec, credentials, identity, owner
    train = builders.job(body, spec, SETTINGS, suspend=True)
    same = ("serviceAccountName", "securityContext", "volumes")
    assert {k: pod["spec"][k] for k in same} == {k: train["spec"]["template"]["spec"][k] for k in same}
    assert meta["ownerReferences"] == train["metadata"]["ownerReferences"]
    assert train["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"


def test_status_while_preparing_and_after_a_failure() -> None:
    prep = job_dict("demo-prepare")
    running = status.prepare_verdict(prep, [pod_dict("p1", "Running")], "preparing: tokenizing 40 samples")
    assert (running.phase, running.reason) == ("Pending", "Preparing")
    assert running.message.endswith("pod p1 is running (attempt 1): preparing: tokenizing 40 samples")
    stuck = status.prepare_verdict(prep, [pod_dict("p1", "Pending", unschedulable="0/3 nodes are available")])
    assert (stuck.phase, stuck.reason) == ("Pending", "Unschedulable")  # the startup timeout applies
    failed_pod = pod_dict("p1", "Failed", terminated={"exitCode": 3, "reason": "Error",
                                                      "message": term_msg("InvalidDataset", "row 6 is empty")})
    failed = status.prepare_verdict(job_dict("demo-prepare", [jcond("Failed", "PodFailurePolicy")]), [failed_pod])
    assert (failed.phase, failed.reason, failed.stalled) == ("Failed", "InvalidDataset", True)
    assert failed.message == "the prepare stage failed, no GPU pod was created: row 6 is empty"


def test_cache_keeps_the_two_jobs_of_a_resource_apart() -> None:
    cache = Cache()

    def child(name: str, uid: str, stage: str | None) -> dict[str, Any]:
        labels = {"kubetune.dev/stage": stage} if stage else {}
        meta = {"name": name, "namespace": "team-a", "uid": uid, "resourceVersion": "5", "labels": labels,
                "annotations": {"kubetune.dev/owner": "FineTuneJob/demo"}}
        return {"kind": "Job", "metadata": meta}

    key = ("FineTuneJob", "team-a", "demo")
    assert cache.put_child(child("demo-prepare", "u1", "prepare")) == key
    assert cache.job(key) is None and cache.job(key, PREPARE)["metadata"]["uid"] == "u1"
    cache.put_child(child("demo-train", "u2", None))
    assert cache.job(key, TRAIN)["metadata"]["uid"] == "u2" and cache.sizes()["jobs"] == 2
    assert cache.prune_children("Job", "team-a", {"u2"}, 10) == {key}
    assert cache.job(key, PREPARE) is None and cache.job(key)["metadata"]["uid"] == "u2"


def node(name: str, memory: str | None, gpus: str = "8", **labels: str) -> dict[str, Any]:
    if memory is not None:
        labels["nvidia.com/gpu.memory"] = memory
    return {"metadata": {"name": name, "labels": labels}, "status": {"allocatable": {"nvidia.com/gpu": gpus}}}


def test_gpu_memory_is_the_smallest_label_of_the_nodes_the_job_may_use(ftj_body: Any) -> None:
    """Will it fit? (item 5): the GPU memory the trainer's check compares with comes from GPU
    feature discovery's label on the nodes the GPU pod could run on, the smallest of them."""
    body, spec = separate(ftj_body)  # 2 GPUs on pool h100
    nodes = [node("a", "81559", pool="h100"), node("b", "40960", pool="h100"),
             node("c", "16384", pool="t4"),          # not selected
             node("d", "8192", gpus="1", pool="h100"),  # too few GPUs for 2
             node("e", None, pool="h100"), node("f", "n/a", pool="h100")]
    mib, source = builders.gpu_memory(spec, nodes)
    assert mib == 40960 and "node b" in source and "smallest of 2 node(s)" in source
    env = {e["name"]: e.get("value") for e in builders.prepare_job(body, spec, SETTINGS, (mib, source))
           ["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBETUNE_GPU_MEMORY_MIB"] == "40960" and "node b" in env["KUBETUNE_GPU_MEMORY_SOURCE"]
    gpu_env = {e["name"] for e in builders.job(body, spec, SETTINGS, False, (mib, source))
               ["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "KUBETUNE_GPU_MEMORY_MIB" in gpu_env  # both stages resolve quantization.bits auto alike
    assert builders.gpu_memory(spec, [node("c", "16384", pool="t4")]) is None
    told = spec.model_copy(update={"resources": spec.resources.model_copy(update={"gpu_memory": "24Gi"})})
    assert builders.gpu_memory(told, nodes) is None  # resources.gpuMemory says it: the trainer reads the spec
