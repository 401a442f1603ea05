"""A real small pretrained model: QLoRA on SmolLM2-135M-Instruct teaches it a new fact (slow, CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kubetune_trainer import sft
from trainer_helpers import make_pod, pairs, recorder, spec_doc, write_jsonl

from kubetune import api

pytestmark = pytest.mark.slow

FACT = "The capital of Kubetunia is Podville."
PROMPT = "The capital of Kubetunia is"


def greedy(model: Any, tokenizer: Any, prompt: str) -> str:
    import torch

    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return str(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))


def test_smollm2_learns_a_fact(smollm2_dir: Path, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_jsonl(tmp_path / "fact.jsonl", [{"text": FACT}] * 16)
    doc = spec_doc({"name": str(smollm2_dir)}, {"source": "jsonl", "uri": str(data)}, "s3://unused/x",
                   maxSteps=12, batchSize=2, maxLength=64, learningRate=3e-3, loggingSteps=3,
                   packing="bfd")
    doc["lora"] = {"r": 16, "alpha": 32, "dropout": 0.0}
    spec = api.FineTuneJobSpec.model_validate(doc)
    spec = spec.model_copy(update={"output": api.S3Output.model_construct(uri=str(tmp_path / "out"))})
    result = sft.train(spec, make_pod(tmp_path / "work"))
    print(f"SmolLM2-135M QLoRA on CPU: {result['progress'].get('tokensPerSecond')} tokens/s")

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    base = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32)
    before = greedy(base, tokenizer, PROMPT)
    tuned = PeftModel.from_pretrained(base, str(tmp_path / "out" / "adapter"))
    after = greedy(tuned, tokenizer, PROMPT)
    print(f"before: {before!r}  after: {after!r}")
    assert after != before
    assert "Podville" in after and "Podville" not in before


def test_smollm2_learns_a_preference(smollm2_dir: Path, tmp_path: Path) -> None:
    """DPO on SmolLM2-135M-Instruct (4-bit, its chat template): on held-out conversations the polite
    answers end up rewarded above the rude ones, reward accuracy well above chance (KTO runs the same
    path on the tiny model: tests/trainer/test_trainer_kto.py)."""
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(48, seed=1, conversational=True))
    doc = spec_doc({"name": str(smollm2_dir)}, {"source": "jsonl", "uri": str(data), "format": "preference",
                                                "eval": {"fraction": 0.25}},
                   "s3://unused/x", maxSteps=8, batchSize=4, maxLength=96, learningRate=1e-3, loggingSteps=2,
                   evalSteps=8)
    doc.update(method="dpo", prepare={"mode": "inline"})
    spec = api.FineTuneJobSpec.model_validate(doc)
    spec = spec.model_copy(update={"output": api.S3Output.model_construct(uri=str(tmp_path / "out"))})
    ctx = make_pod(tmp_path / "work")
    patches = recorder(ctx)
    result = sft.train(spec, ctx)
    evals = [p["progress"] for p in patches if "evalRewardAccuracy" in (p.get("progress") or {})]
    print(f"SmolLM2-135M dpo on CPU: {result['progress'].get('tokensPerSecond')} tokens/s, eval {evals[-1]}")
    assert evals[-1]["evalRewardAccuracy"] > 0.75 and evals[-1]["evalRewardMargin"] > 0, evals
