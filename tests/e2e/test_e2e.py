"""End to end: kubectl apply -> operator -> Job -> pod (pod runner) -> real QLoRA training -> S3.

Everything is real except the node: a local control plane (or a kind cluster, see
``hack/e2e-kind.sh``), the CRDs, the operator with the chart's RBAC, the trainer and merge
containers (local processes via the pod runner), an S3 server, a tiny Llama with SmolLM2's
tokenizer. Run::

    .venv/bin/python -m pytest tests/e2e -m e2e
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from e2e_support import BUCKET, RUNNER_SELECTOR, System, wait_for

pytestmark = pytest.mark.e2e

FTJ, MJ = "finetunejobs", "mergejobs"
RUN_TIMEOUT = 420  # seconds for one training run on a 2-core CPU, model download and upload included


def finetune(system: System, name: str, *, dataset_uri: str | None = None, max_steps: int = 6,
             save_steps: int = 3, **training: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
        "spec": {
            "model": {"uri": system.model_uri},
            "dataset": {"source": "jsonl", "uri": dataset_uri or system.dataset_uri, "format": "text"},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "training": {"maxSteps": max_steps, "saveSteps": save_steps, "loggingSteps": 1, "batchSize": 2,
                         "maxLength": 64, "learningRate": 1e-3, "gradientCheckpointing": False, **training},
            "output": {"uri": f"s3://{BUCKET}/runs/{system.namespace}/{name}"},
            "storage": system.storage(),
            "resources": {"gpus": 1, "nodeSelector": RUNNER_SELECTOR},
            "backoffLimit": 2,
        },
    }


def phase_is(system: System, plural: str, name: str, *phases: str) -> dict[str, Any] | None:
    obj = system.resource(plural, name)
    return obj if obj and (obj.get("status") or {}).get("phase") in phases else None


def wait_phase(system: System, plural: str, name: str, *phases: str, timeout: float = RUN_TIMEOUT) -> dict[str, Any]:
    """Poll until the resource reaches one of ``phases``; on timeout show operator and pod logs."""
    try:
        return wait_for(lambda: phase_is(system, plural, name, *phases), timeout, f"{plural}/{name} in {phases}",
                        interval=1.0)
    except AssertionError as err:
        obj = system.resource(plural, name)
        raise AssertionError(f"{err}\nstatus: {(obj or {}).get('status')}\n{system.diagnostics()}") from None


def pod_log(system: System, pod: dict[str, Any]) -> str:
    name = pod["metadata"]["name"]
    if system.runner is not None:
        path = system.runner.log_path(system.namespace, name)
        return path.read_text(errors="replace") if path else ""
    return system.cluster.kubectl("logs", "-n", system.namespace, name, check=False).stdout


def job_pods(system: System, name: str, stage: str | None = None) -> list[dict[str, Any]]:
    """A FineTuneJob's pods, oldest first: its GPU Job's, or (``stage`` "prepare") its CPU prepare Job's."""
    selector = f"kubetune.dev/job-name={name},{f'kubetune.dev/stage={stage}' if stage else '!kubetune.dev/stage'}"
    return sorted(system.pods(selector), key=lambda p: p["metadata"]["creationTimestamp"])


def asked_for_gpus(system: System, name: str) -> list[str]:
    """Pods of the FineTuneJob (either stage) that the API server shows asking for a GPU."""
    return [p["metadata"]["name"] for p in system.pods(f"kubetune.dev/job-name={name}")
            if any("nvidia.com/gpu" in ((c.get("resources") or {}).get("limits") or {})
                   for c in p["spec"]["containers"])]


def failed_once_in_prepare(system: System, name: str, st: dict[str, Any]) -> None:
    """The prepare stage failed after one pod, and nothing asked for a GPU (issue #18)."""
    assert "jobName" not in st and st["prepareJobName"] == f"{name}-prepare", st
    path = f"/apis/batch/v1/namespaces/{system.namespace}/jobs/{st['prepareJobName']}"

    def counted() -> dict[str, Any] | None:
        # The Job controller may mark the Job FailureTarget before it moves the pod out of
        # uncountedTerminatedPods into status.failed: wait for the count, then check it is one pod.
        js = system.cluster.get(path).get("status") or {}
        uncounted = js.get("uncountedTerminatedPods") or {}
        return js if not uncounted.get("failed") and not uncounted.get("succeeded") else None

    job_status = wait_for(counted, 60, "the Job controller to count the failed pod")
    assert job_status.get("failed") == 1 and not job_status.get("succeeded"), job_status
    assert system.cluster.get(f"/apis/batch/v1/namespaces/{system.namespace}/jobs/{name}-train") is None
    assert not asked_for_gpus(system, name)


def condition(obj: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next(c for c in obj["status"]["conditions"] if c["type"] == ctype)


def printed_table(system: System, kind: str) -> dict[str, dict[str, str]]:
    """``kubectl get <kind>`` as {name: {COLUMN: value}}, sliced at the header's column positions
    (empty cells stay empty strings)."""
    lines = system.cluster.kubectl("get", kind, "-n", system.namespace).stdout.splitlines()
    starts = [m.start() for m in re.finditer(r"\S+", lines[0])]
    bounds = list(zip(starts, [*starts[1:], None], strict=True))
    header = [lines[0][a:b].strip() for a, b in bounds]
    rows = [[line[a:b].strip() for a, b in bounds] for line in lines[1:]]
    return {row[0]: dict(zip(header, row, strict=True)) for row in rows}


@pytest.mark.timeout(2 * RUN_TIMEOUT + 120)
def test_finetune_then_merge(system: System) -> None:
    name = "happy"
    system.cluster.apply(finetune(system, name, max_steps=6, save_steps=3), namespace=system.namespace)
    ftj = wait_phase(system, FTJ, name, "Succeeded", "Failed")
    st = ftj["status"]
    assert st["phase"] == "Succeeded", f"{st}\n{system.diagnostics()}"
    progress = st["progress"]
    assert progress["step"] == progress["totalSteps"] == 6
    assert progress["percent"] == 100
    assert isinstance(progress["loss"], float) and progress["loss"] > 0
    assert condition(ftj, "Succeeded")["status"] == "True" and condition(ftj, "Ready")["status"] == "True"
    assert st["attempts"] == 1
    assert st["data"]["trainingRows"] > 0 and st["data"]["truncatedSamples"] == 0  # what the data held
    # two stages: the CPU prepare pod tokenized and stored the data, the GPU pod only read it
    assert st["prepareJobName"] == f"{name}-prepare" and "/.kubetune/prepared/" in st["data"]["preparedUri"]
    # will it fit? the prepare stage's estimate against the node's nvidia.com/gpu.memory label (16 GiB)
    assert st["memory"]["fits"] is True and st["memory"]["bits"] == 4 and st["memory"]["gpuMemoryMiB"] == 16384, st
    assert "nvidia.com/gpu.memory label of node" in st["memory"]["gpuMemorySource"], st
    (prepare_pod,) = job_pods(system, name, "prepare")
    gpu_pod = job_pods(system, name)[-1]
    assert asked_for_gpus(system, name) == [gpu_pod["metadata"]["name"]]
    # the prepare pod tokenized, or reused what an earlier job of this namespace (same data, same
    # tokenizer, outputs in the same folder) had stored: content-addressed
    prepare_log = pod_log(system, prepare_pod)
    assert re.search(r"prepared \d+ training samples|reusing the prepared data at", prepare_log), prepare_log
    gpu_log = pod_log(system, gpu_pod)
    assert "no tokenization here" in gpu_log and not re.search(r"prepared \d+ training samples", gpu_log), \
        gpu_log[-3000:]
    adapter = st["adapterUri"]
    assert adapter.startswith(f"s3://{BUCKET}/runs/{system.namespace}/{name}/")
    files = set(system.s3_keys(adapter))
    assert {"adapter_config.json", "manifest.json"} <= files, files
    assert any(f.startswith("adapter_model") for f in files), files
    manifest = system.s3_json(adapter.rstrip("/") + "/manifest.json")
    assert set(manifest["files"]) >= {"adapter_config.json"}

    table = printed_table(system, "finetunejobs")
    row = table[name]
    assert list(row) == ["NAME", "PHASE", "MODEL", "PROGRESS", "LOSS", "ETA", "STAGE", "AGE"], row
    assert row["STAGE"] == "done", row
    assert row["PHASE"] == "Succeeded" and row["PROGRESS"] == "100"
    assert row["MODEL"] == st["model"] and st["model"].startswith("s3://"), row  # spec.model.uri
    assert float(row["LOSS"]) == pytest.approx(progress["loss"], rel=1e-3)
    assert row["ETA"] == progress["eta"] and re.fullmatch(r"\d+[smh].*", row["AGE"]), row

    merged_uri = f"s3://{BUCKET}/runs/{system.namespace}/{name}-merged"
    system.cluster.apply({
        "apiVersion": "kubetune.dev/v1alpha1", "kind": "MergeJob", "metadata": {"name": f"{name}-merge"},
        "spec": {"source": {"fineTuneJobRef": {"name": name}}, "dtype": "float32",
                 "output": {"uri": merged_uri},
                 "verify": {"prompts": ["Question: what is qlora?\nAnswer:"], "maxNewTokens": 4},
                 "resources": {"nodeSelector": RUNNER_SELECTOR}},
    }, namespace=system.namespace)
    mj = wait_phase(system, MJ, f"{name}-merge", "Succeeded", "Failed")
    ms = mj["status"]
    assert ms["phase"] == "Succeeded", f"{ms}\n{system.diagnostics()}"
    assert ms["mergedUri"].rstrip("/") == merged_uri
    assert ms["adapterUri"] == adapter
    assert ms["verification"]["passed"] is True
    assert ms["verification"]["maxLogitDiff"] <= ms["verification"]["tolerance"]
    assert len(ms["samples"]) == 1 and ms["samples"][0]["prompt"].startswith("Question")
    merged_files = set(system.s3_keys(merged_uri))
    assert {"config.json", "manifest.json", "tokenizer.json"} <= merged_files, merged_files
    assert any(f.endswith(".safetensors") for f in merged_files), merged_files
    assert printed_table(system, "mergejobs")[f"{name}-merge"]["PHASE"] == "Succeeded"

    # Another job (another name, a dataset that does not exist) pointed at this job's output.uri: it
    # used to end Succeeded in seconds with this job's adapter as its own. Now it fails at once, names
    # the run that owns the output, trains nothing and leaves that result alone.
    other = finetune(system, "same-output", dataset_uri=f"s3://{BUCKET}/no-such-data.jsonl")
    other["spec"]["output"]["uri"] = f"s3://{BUCKET}/runs/{system.namespace}/{name}"
    system.cluster.apply(other, namespace=system.namespace)
    refused = wait_phase(system, FTJ, "same-output", "Failed", "Succeeded")
    failed = condition(refused, "Failed")
    assert failed["reason"] == "OutputConflict", f"{refused['status']}\n{system.diagnostics()}"
    assert f"already holds the result of FineTuneJob {system.namespace}/{name}" in failed["message"]
    assert "dataset.uri" in failed["message"]
    failed_once_in_prepare(system, "same-output", refused["status"])  # refused on CPU, before any GPU
    assert "adapterUri" not in refused["status"]
    assert "progress" not in refused["status"]
    assert system.s3_json(adapter.rstrip("/") + "/manifest.json") == manifest


def test_bad_dataset_fails_without_retries(system: System) -> None:
    name = "bad-data"
    system.cluster.apply(finetune(system, name, dataset_uri=system.bad_dataset_uri), namespace=system.namespace)
    ftj = wait_phase(system, FTJ, name, "Failed", "Succeeded")
    st = ftj["status"]
    assert st["phase"] == "Failed"
    failed = condition(ftj, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "InvalidDataset", failed
    # a permanent failure in the CPU prepare stage: the pod failure policy fails its Job at once,
    # and no GPU Job or GPU pod is ever made
    failed_once_in_prepare(system, name, st)


def test_missing_model_fails_at_once_without_a_second_pod(system: System) -> None:
    """A model.uri folder that does not exist used to be a StorageError, retried until the backoff
    limit (4 GPU pods). It is the spec's input: InvalidSpec, one CPU pod, no retry, no GPU pod."""
    name = "no-model"
    manifest = finetune(system, name)
    manifest["spec"]["model"]["uri"] = f"s3://{BUCKET}/models/no-such-model"
    system.cluster.apply(manifest, namespace=system.namespace)
    ftj = wait_phase(system, FTJ, name, "Failed", "Succeeded")
    failed = condition(ftj, "Failed")
    assert failed["reason"] == "InvalidSpec" and "no-such-model" in failed["message"], ftj["status"]
    failed_once_in_prepare(system, name, ftj["status"])
    assert len(system.pods(f"kubetune.dev/job-name={name}")) <= 1


def test_a_run_that_cannot_fit_fails_before_any_gpu_pod(system: System) -> None:
    """Will it fit? (issue #18, item 5) 131072-token rows need a dense sdpa mask of 32 GiB: more than
    the 16 GiB the runner node's GPU feature-discovery label says its GPUs have. The CPU prepare stage
    refuses it from the model's config, says what would fit, and no GPU pod is ever made."""
    name = "too-big"
    system.cluster.apply(finetune(system, name, maxLength=131072), namespace=system.namespace)
    ftj = wait_phase(system, FTJ, name, "Failed", "Succeeded")
    failed = condition(ftj, "Failed")
    assert failed["reason"] == "InsufficientGPUMemory", ftj["status"]
    assert "each GPU has 16.0 GiB (the nvidia.com/gpu.memory label of node" in failed["message"], failed
    assert "this would fit: training.maxLength 65536" in failed["message"], failed
    memory = ftj["status"]["memory"]
    assert memory["fits"] is False and memory["gpuMemoryMiB"] == 16384 and memory["estimatedMiB"] > 16384, memory
    failed_once_in_prepare(system, name, ftj["status"])


@pytest.mark.timeout(2 * RUN_TIMEOUT + 300)
def test_suspend_keeps_checkpoint_and_resume_continues(system: System) -> None:
    name = "pausable"
    total = 40  # 0.5-4 s a step on 2 cores: the suspend (a few seconds to reach the pod) lands before the end
    system.cluster.apply(finetune(system, name, max_steps=total, save_steps=2), namespace=system.namespace)
    selector = f"kubetune.dev/job-name={name},!kubetune.dev/stage"  # the GPU Job's pods

    def checkpointed() -> dict[str, Any] | None:
        obj = system.resource(FTJ, name) or {}
        st = obj.get("status") or {}
        if st.get("phase") in ("Succeeded", "Failed"):
            raise AssertionError(f"the run ended before it could be suspended: {st}\n{system.diagnostics()}")
        return st if st.get("checkpointUri") else None  # sent at once; progress itself is throttled (5 s)

    before = wait_for(checkpointed, RUN_TIMEOUT, "a first checkpoint", interval=0.5)
    system.cluster.kubectl("patch", "finetunejob", name, "-n", system.namespace, "--type=merge",
                           "-p", '{"spec": {"suspend": true}}')
    suspended = wait_phase(system, FTJ, name, "Suspended", timeout=180)
    assert condition(suspended, "Suspended")["status"] == "True"
    wait_for(lambda: not system.pods(selector), 120, "the training pod to be gone")

    # The checkpoint is kept in storage and the pointer names it.
    latest = system.s3_json(f"s3://{BUCKET}/runs/{system.namespace}/{name}/checkpoints/latest.json")
    saved_step = int(latest["step"])
    assert saved_step >= int(before["checkpointUri"].rsplit("step-", 1)[1]) >= 2
    assert system.s3_keys(suspended["status"]["checkpointUri"]), "checkpoint objects missing"

    system.cluster.kubectl("patch", "finetunejob", name, "-n", system.namespace, "--type=merge",
                           "-p", '{"spec": {"suspend": false}}')
    done = wait_phase(system, FTJ, name, "Succeeded", "Failed")
    assert done["status"]["phase"] == "Succeeded", f"{done['status']}\n{system.diagnostics()}"
    assert done["status"]["progress"]["step"] == total
    if system.runner is not None:  # the resumed pod's log says where it started
        runs = [r for r in system.runner.runs.values() if r.namespace == system.namespace
                and r.name.startswith(f"{name}-train")]
        assert len(runs) >= 2, [r.name for r in runs]
        m = re.search(r"resuming from step (\d+)", runs[-1].log_path.read_text())
        assert m, f"no resume line in {runs[-1].log_path}"
        assert int(m.group(1)) >= saved_step
    else:  # a real kubelet: the resumed pod's log, through the API server
        pods = sorted(system.pods(selector), key=lambda p: p["metadata"]["creationTimestamp"])
        assert len(pods) >= 1
        log = system.cluster.kubectl("logs", "-n", system.namespace, pods[-1]["metadata"]["name"]).stdout
        m = re.search(r"resuming from step (\d+)", log)
        assert m, log[-3000:]
        assert int(m.group(1)) >= saved_step


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def example(system: System, file: str) -> list[dict[str, Any]]:
    """The resources of ``examples/<file>``, with this system's model, S3 server and datasets."""
    import yaml

    client, prefix = system.s3.client(), f"data/{system.namespace}"
    docs = [d for d in yaml.safe_load_all((EXAMPLES / file).read_text()) if d]
    for doc in docs:
        spec = doc["spec"]
        spec["output"]["uri"] = f"s3://{BUCKET}/runs/{system.namespace}/{doc['metadata']['name']}"
        if doc["kind"] == "FineTuneJob":
            name = spec["dataset"]["uri"].rsplit("/", 1)[1]
            client.upload_file(str(EXAMPLES / "data" / name), BUCKET, f"{prefix}/{name}")
            spec["model"]["uri"] = system.model_uri
            spec["dataset"]["uri"] = f"s3://{BUCKET}/{prefix}/{name}"
            spec["storage"] = system.storage()
            spec["backoffLimit"] = 1
    return docs


def merged_model_loads(system: System, mj: dict[str, Any], adapter_uri: str, tmp_path: Path) -> None:
    """The MergeJob merged that adapter and verified it; its model loads and generates with plain transformers."""
    assert mj["status"]["phase"] == "Succeeded", f"{mj['status']}\n{system.diagnostics()}"
    assert mj["status"]["adapterUri"] == adapter_uri and mj["status"]["verification"]["passed"] is True
    merged = mj["status"]["mergedUri"].rstrip("/")
    files = set(system.s3_keys(merged))
    assert {"config.json", "tokenizer.json"} <= files and any(f.endswith(".safetensors") for f in files), files
    bucket, _, key = merged.removeprefix("s3://").partition("/")
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        system.s3.client().download_file(bucket, f"{key}/{name}", str(tmp_path / name))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path)  # plain transformers: no peft, no kubetune
    ids = AutoTokenizer.from_pretrained(tmp_path)("### Question: what is s3?\n### Answer:", return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] > ids["input_ids"].shape[1]


@pytest.mark.timeout(4 * RUN_TIMEOUT)
def test_sft_then_dpo_on_its_adapter_then_merge(system: System, tmp_path: Path) -> None:
    """Issue #19: examples/sft-dpo-merge.yaml applied at once -- an SFT job, a DPO job chained to it
    (model.adapterFrom.fineTuneJobRef: it waits for the SFT job, then continues its adapter) and a
    MergeJob of the DPO job -- with this system's model (the tiny one), S3 server and datasets; the
    merged model loads with plain transformers."""
    sft_job, dpo, merge = example(system, "sft-dpo-merge.yaml")
    system.cluster.apply(dpo, merge, sft_job, namespace=system.namespace)
    waiting = wait_for(lambda: phase_is(system, FTJ, "assistant-dpo", "Pending"), 60, "assistant-dpo pending")
    # applied before the SFT job: not found yet, or waiting for it (woken when it appears)
    assert condition(waiting, "Ready")["reason"] in ("FineTuneJobNotFound", "WaitingForFineTuneJob"), waiting["status"]
    first = wait_phase(system, FTJ, "assistant-sft", "Succeeded", "Failed")
    assert first["status"]["phase"] == "Succeeded", f"{first['status']}\n{system.diagnostics()}"
    ftj = wait_phase(system, FTJ, "assistant-dpo", "Succeeded", "Failed")
    st = ftj["status"]
    assert st["phase"] == "Succeeded", f"{st}\n{system.diagnostics()}"
    assert {"rewardMargin", "rewardAccuracy", "evalRewardAccuracy"} <= set(st["progress"]), st["progress"]
    config = system.s3_json(st["adapterUri"].rstrip("/") + "/adapter_config.json")
    assert config["r"] == 8, config  # the SFT job's adapter, trained further
    merged_model_loads(system, wait_phase(system, MJ, "assistant-merge", "Succeeded", "Failed"), st["adapterUri"],
                       tmp_path)


@pytest.mark.timeout(3 * RUN_TIMEOUT)
def test_orpo_then_merge(system: System, tmp_path: Path) -> None:
    """examples/orpo-merge.yaml applied at once: an ORPO job from the base (no SFT job, no reference
    model) reports its supervised loss and preference metrics, and the MergeJob of it publishes a
    model that loads with plain transformers."""
    orpo, merge = example(system, "orpo-merge.yaml")
    system.cluster.apply(merge, orpo, namespace=system.namespace)
    st = wait_phase(system, FTJ, "assistant-orpo", "Succeeded", "Failed")["status"]
    assert st["phase"] == "Succeeded", f"{st}\n{system.diagnostics()}"
    assert {"nllLoss", "logOddsRatio", "rewardAccuracy", "evalRewardAccuracy"} <= set(st["progress"]), st["progress"]
    merged_model_loads(system, wait_phase(system, MJ, "assistant-orpo-merge", "Succeeded", "Failed"),
                       st["adapterUri"], tmp_path)
