"""Helpers for the merge tests: adapters built WITHOUT the trainer, references, fresh-process reloads.

Each adapter is a real PEFT LoRA on a real base (``peft.get_peft_model``) whose ``lora_B`` (and
``modules_to_save`` copies) get random non-zero values, so the adapter really changes the logits.
It is saved with ``save_pretrained``, uploaded to the S3 server, and given a kubetune
``manifest.json`` (``storage.write_manifest``, with the ``spec`` and ``files`` the trainer writes).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubetune_trainer import storage

from kubetune import contract

HERE = Path(__file__).resolve().parent
BUCKET = "merge-tests"
PROBES = ("Hello, how are you today?", "def add(a, b):\n    return a + b\n", "Kubernetes runs containers.")


@dataclass
class Adapter:
    """An adapter published to S3, with the local folders needed to compute references."""

    uri: str  # s3:// adapter folder (with manifest.json unless built without)
    local: Path  # the saved PEFT folder
    base_dir: Path  # the base model folder it was trained on
    base_uri: str  # the base model in S3, as named in the adapter's manifest


def store_for(server: Any) -> Any:
    from kubetune_trainer import storage

    return storage.Store(endpoint=server.endpoint, access_key=server.env["AWS_ACCESS_KEY_ID"],
                         secret_key=server.env["AWS_SECRET_ACCESS_KEY"])


TRAINING_FINGERPRINT = "0f" * 32  # what the trainer's manifest carries (kubetune_trainer.fingerprint)


def finetune_spec(base: dict[str, Any], lora: dict[str, Any] | None = None) -> dict[str, Any]:
    """The FineTuneJobSpec wire dict the trainer records in the adapter manifest."""
    from kubetune import api

    return api.FineTuneJobSpec.model_validate({
        "model": base,
        "lora": lora or {},
        "dataset": {"source": "jsonl", "uri": f"s3://{BUCKET}/data/train.jsonl"},
        "training": {"maxSteps": 10},
        "output": {"uri": f"s3://{BUCKET}/runs/x"},
    }).to_wire()


def build_adapter(base_dir: Path, out: Path, seed: int = 0, std: float = 0.05, **lora: Any) -> Path:
    """A LoRA adapter with random non-zero weights (what training would produce), saved to ``out``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(**{"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear", **lora})
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding" in name:
                param.normal_(0.0, std)
            elif "modules_to_save" in name:
                param.add_(torch.randn_like(param) * std)
    peft_model.save_pretrained(out)
    return out


def publish_adapter(server: Any, adapter_dir: Path, uri: str, model: dict[str, Any],
                    lora: dict[str, Any] | None = None, manifest: bool = True) -> str:
    """Upload an adapter folder and (unless ``manifest=False``) its kubetune manifest, written last."""
    from kubetune_trainer import storage

    store = store_for(server)
    files = store.upload_dir(adapter_dir, uri)
    if manifest:
        storage.write_manifest(store, uri, files, kind="adapter", spec=finetune_spec(model, lora),
                               fingerprint=TRAINING_FINGERPRINT)
    return uri


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:60]


def reference_logits(base_dir: Path, adapter_dir: Path | None, dtype: str) -> list[Any]:
    """Logits of base (+ adapter through PEFT, unmerged) on PROBES, in this process: the base's
    weights rounded to ``dtype``, the adapter's kept in float32 (as PEFT loads them), float32 math."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    # Weights rounded to the dtype, arithmetic in float32 (an exact upcast), as the recipe checks.
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=getattr(torch, dtype)).float().eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        return [model(**tokenizer(p, return_tensors="pt")).logits[0].float() for p in PROBES]


def fresh_process_logits(model_dir: Path, dtype: str, out: Path) -> list[Any]:
    """Load ``model_dir`` with plain ``AutoModelForCausalLM.from_pretrained`` in a NEW Python process."""
    import torch

    subprocess.run([sys.executable, str(HERE / "reload_logits.py"), str(model_dir), dtype, str(out),
                    json.dumps(PROBES)], check=True, timeout=300)
    return list(torch.load(out))


def max_diff(a: list[Any], b: list[Any]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def assert_published(s3: Any, out_uri: str, local: Path, result: dict[str, Any]) -> dict[str, Any]:
    """The output is a complete standalone model whose manifest checksums match what is stored."""
    manifest = storage.read_manifest(store_for(s3), out_uri)
    assert manifest is not None, "no manifest.json: the merge was not published as complete"
    stored = set(store_for(s3).list(out_uri)) - {contract.MANIFEST}
    assert set(manifest["files"]) == stored
    assert storage.verify_files(local, manifest) == []
    assert "adapter_config.json" not in stored and not any(f.startswith("adapter_model") for f in stored)
    assert {"config.json", "generation_config.json", "tokenizer_config.json"} <= stored
    assert any(f.endswith(".safetensors") for f in stored)
    assert result["mergedUri"] == out_uri == manifest["mergedUri"]
    assert result["verification"]["passed"] is True
    assert result["verification"]["maxLogitDiff"] <= result["verification"]["tolerance"]
    return manifest


def assert_matches_base_plus_adapter(merged: list[Any], adapter: Adapter, dtype: str, result: dict[str, Any]) -> None:
    """Merged logits equal base+adapter (PEFT, unmerged) within the dtype's tolerance, and are far
    from the base alone: the adapter is really in."""
    with_adapter = reference_logits(adapter.base_dir, adapter.local, dtype)
    base_only = reference_logits(adapter.base_dir, None, dtype)
    scale = max(float(t.abs().max()) for t in with_adapter)
    tolerance = {"float32": 1e-4, "bfloat16": 2.5e-2}[dtype] * max(scale, 1.0)
    diff = max_diff(merged, with_adapter)
    assert diff <= tolerance
    assert max_diff(merged, base_only) > max(tolerance, 10 * diff)
    # The recorded verification is about the very model that was published.
    assert result["verification"]["tolerance"] == pytest.approx(tolerance, rel=0.05)
