"""Real 4-bit NF4 QLoRA training on CPU with the tiny Llama: bfd and wrapped packing, results in S3
(or a local folder), adapters loadable by plain peft, manifests whose checksums hold."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from kubetune_trainer import sft
from kubetune_trainer.runtime import StatusReporter
from kubetune_trainer.storage import Store, verify_files
from trainer_helpers import QA, make_pod, qa_rows, spec_doc, write_jsonl

from kubetune import api

TEMPLATE = "Question: {question}\nAnswer: {answer}"


class RecordingReporter(StatusReporter):
    """Our own status channel, keeping what it would have patched."""

    def __init__(self) -> None:
        super().__init__(None, None, None, None, None, None)
        self.patches: list[dict[str, Any]] = []

    def patch(self, status: dict[str, Any]) -> bool:
        self.patches.append(json.loads(json.dumps(status)))
        return True


def logged_losses(manifest_or_state: list[dict[str, Any]]) -> list[float]:
    return [h["loss"] for h in manifest_or_state if "loss" in h]


def load_adapter_with_plain_peft(base_dir: Path, adapter_dir: Path) -> Any:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
    assert tuned.shape[-1] == base.config.vocab_size
    with model.disable_adapter(), torch.no_grad():
        plain = model(input_ids=ids).logits
    assert (tuned - plain).abs().max() > 1e-4, "the trained adapter must change the logits"
    return model


def test_qlora_bfd_from_s3_to_s3(tiny_model_dir: Path, s3: Any, s3_env: dict[str, str], bucket: str, prefix: str,
                                 tmp_path: Path) -> None:
    model_uri = s3.upload_dir(tiny_model_dir, *f"{prefix}/base".split("/", 1))
    client, (bkt, key) = s3.client(), prefix.split("/", 1)
    client.put_object(Bucket=bkt, Key=f"{key}/data/qa.jsonl",
                      Body="".join(json.dumps(r) + "\n" for r in qa_rows(40)))
    out = f"s3://{prefix}/run"
    doc = spec_doc({"uri": model_uri},
                   {"source": "jsonl", "uri": f"s3://{prefix}/data/qa.jsonl", "format": "template",
                    "template": TEMPLATE, "eval": {"fraction": 0.1}},
                   out, s3.endpoint, maxSteps=20, saveSteps=8, keepCheckpoints=2, loggingSteps=4, evalSteps=10,
                   packing="bfd")
    spec = api.FineTuneJobSpec.model_validate(doc)
    pod = make_pod(tmp_path / "work")
    pod.reporter = reporter = RecordingReporter()

    result = sft.train(spec, pod)

    store = Store.from_spec(spec.storage)
    # -- result and live progress
    assert result["adapterUri"] == f"{out}/adapter" and result["reportUri"] == f"{out}/report.md"
    assert result["checkpointUri"] == f"{out}/checkpoints/step-20"
    progress = result["progress"]
    assert (progress["step"], progress["totalSteps"], progress["percent"]) == (20, 20, 100)
    assert progress["tokensPerSecond"] > 0 and progress["evalLoss"] > 0 and progress["eta"] == "0s"
    reported = [p["progress"] for p in reporter.patches if "progress" in p]
    steps = [p["step"] for p in reported]
    assert steps[0] == 1 and steps[-1] == 20 and steps == sorted(steps)  # throttled: first, last, in order
    assert all(0 <= p["percent"] <= 100 and p["updatedAt"].endswith("Z") for p in reported)
    assert {"checkpointUri": f"{out}/checkpoints/step-8"} in reporter.patches
    # -- what the pod says it is doing goes to status.stage; status.message is the operator's
    manifest = store.get_json(f"{out}/manifest.json")
    assert [p["stage"] for p in reporter.patches if "stage" in p] == [
        f"preparing: loading dataset s3://{prefix}/data/qa.jsonl",
        f"preparing: tokenizing {manifest['data']['trainingRows']} samples", "preparing: storing the tokenized data",
        "preparing: estimating the GPU memory", f"loading model {model_uri}", "training from step 0",
        "uploading the adapter and report"]
    assert not [p for p in reporter.patches if "message" in p]
    # what the data holds reaches the status before training starts, as the report has it
    assert [p["data"] for p in reporter.patches if "data" in p] == [manifest["data"]]
    assert manifest["data"]["evalSamples"] == manifest["data"]["evalRows"] == 4  # under dataset.eval.maxSamples
    # -- loss goes down
    assert manifest["metrics"]["finalLoss"] < manifest["metrics"]["firstLoss"]
    # -- checkpoints: keepCheckpoints=2 of steps 8, 16, 20; the pointer names the newest
    assert store.get_json(f"{out}/checkpoints/latest.json")["step"] == 20
    assert sorted({k.split("/")[0] for k in store.list(f"{out}/checkpoints") if "/" in k}) == ["step-16", "step-20"]
    # -- every file of the manifest is there with its checksum; the adapter has its own manifest
    local = tmp_path / "published"
    store.download_dir(out, local)
    assert verify_files(local, manifest) == []
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/tokenizer.json",
            "adapter/manifest.json", "spec.json", "report.md", "loss.png"} <= set(manifest["files"])
    adapter_manifest = json.loads((local / "adapter" / "manifest.json").read_text())
    assert verify_files(local / "adapter", adapter_manifest) == []
    assert adapter_manifest["spec"]["model"] == {"uri": model_uri, "trustRemoteCode": False}
    assert json.loads((local / "spec.json").read_text()) == spec.to_wire()
    assert "| 20 |" in (local / "report.md").read_text()
    assert (local / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    load_adapter_with_plain_peft(tiny_model_dir, local / "adapter")

    # -- a retried pod after success trains nothing and returns the same result
    started = time.monotonic()
    again = sft.train(spec, make_pod(tmp_path / "work2"))
    assert again == result
    assert time.monotonic() - started < 10
    assert not (tmp_path / "work2" / "trainer").exists()


def test_qlora_wrapped_messages_with_wandb_offline(tiny_model_dir: Path, tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA[:12]]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "out"
    doc = spec_doc({"name": str(tiny_model_dir)}, {"source": "jsonl", "uri": str(data), "format": "messages"},
                   "s3://unused/x", maxSteps=20, saveSteps=50, loggingSteps=5, packing="wrapped", maxLength=48,
                   batchSize=1, gradientCheckpointing=True)
    doc["tracking"] = {"wandb": {"project": "kubetune-tests", "mode": "offline"}}
    spec = api.FineTuneJobSpec.model_validate(doc)
    spec = spec.model_copy(update={"output": api.S3Output.model_construct(uri=str(out))})

    result = sft.train(spec, make_pod(tmp_path / "work"))

    manifest = json.loads((out / "manifest.json").read_text())
    assert verify_files(out, manifest) == []
    assert manifest["metrics"]["finalLoss"] < manifest["metrics"]["firstLoss"]
    assert result["progress"]["step"] == 20
    # wrapped rows of 48 tokens from 40 short chats: fewer rows than steps, so the data was re-iterated
    assert manifest["data"]["tokens"] < 20 * 48 and result["progress"]["epoch"] > 1
    # the offline W&B run travels with the artifacts
    assert result["wandbUrl"] == str(out / "wandb")
    assert any(name.startswith("wandb/") and name.endswith(".wandb") for name in manifest["files"])
    load_adapter_with_plain_peft(tiny_model_dir, out / "adapter")


@pytest.mark.parametrize("bits", [16])
def test_plain_lora_and_prompt_completion(bits: int, tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": q, "completion": a} for q, a in QA])
    doc = spec_doc({"name": str(tiny_model_dir)}, {"source": "jsonl", "uri": str(data), "format": "promptCompletion"},
                   "s3://unused/x", maxSteps=3, loggingSteps=1)
    doc["quantization"] = {"bits": bits}
    spec = api.FineTuneJobSpec.model_validate(doc)
    spec = spec.model_copy(update={"output": api.S3Output.model_construct(uri=str(tmp_path / "out"))})
    result = sft.train(spec, make_pod(tmp_path / "work"))
    assert result["progress"]["step"] == 3
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["peft_type"] == "LORA"
