"""Will it fit? (issue #18, item 5) The peak-memory estimate of kubetune_trainer.memory against
what was measured: the three H100 peaks of docs/benchmarks.md (torch.cuda.max_memory_allocated,
Llama-3.2-1B and Llama-3.1-8B shapes, the trainer's defaults) and, on CPU, the LoRA weight count of
a real peft model. The plan: bits auto, refusals that say what would fit, where the GPU memory
figure comes from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kubetune_trainer import memory
from trainer_helpers import spec_doc

from kubetune import api, contract

# bench/trainer.py's shapes (the GPU runs of docs/benchmarks.md)
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True)
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
DEFAULT_LORA = api.Lora()  # r 16 on all linear layers: 11.27M (1B) and 41.94M (8B) trainable, as measured


def llama(**shape: Any) -> memory.Shape:
    from transformers import LlamaConfig

    return memory.shape_of(LlamaConfig(**shape), DEFAULT_LORA)


# (shape, tokens a micro-batch flattened into one row, measured peak MiB, where)
MEASURED = [
    (LLAMA_1B, 4096, 3278, "run 3: one packed row of 4096 a micro-batch (the defaults since)"),
    (LLAMA_1B, 16384, 8787, "run 1: 4 packed rows flattened into one of 16384"),
    (LLAMA_8B, 16384, 24688, "run 2: 4 packed rows flattened into one of 16384"),
]


@pytest.mark.parametrize("shape, tokens, measured, run", MEASURED, ids=["1b-4096", "1b-16384", "8b-16384"])
def test_estimate_matches_the_measured_gpu_peaks(shape: dict[str, Any], tokens: int, measured: int, run: str) -> None:
    counted = llama(**shape)
    assert counted.lora in (11_272_192, 41_943_040)  # the trainable parameters the runs reported
    got = memory.estimate(counted, memory.Setup(bits=4, tokens=tokens, row_tokens=tokens)).total / memory.MiB
    error = got / measured - 1
    print(f"{run}: estimated {got:,.0f} MiB, measured {measured:,} MiB ({error:+.1%})")
    assert abs(error) < 0.05, (run, got, measured)


def test_lora_count_is_peft_s(tiny_model_dir: Path) -> None:
    """The adapter the estimate counts is the adapter peft builds (all-linear and named targets)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    for lora in (api.Lora(r=8), api.Lora(r=4, target_modules=["q_proj", "v_proj"])):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        base = sum(p.numel() for p in model.parameters())
        targets = "all-linear" if lora.target_modules == ["all-linear"] else lora.target_modules
        peft_model = get_peft_model(model, LoraConfig(r=lora.r, target_modules=targets))
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        shape = memory.shape_of(config, lora)
        assert shape.lora == trainable
        assert shape.linear + shape.other == base


def spec(**over: Any) -> api.FineTuneJobSpec:
    doc = spec_doc({"name": "m"}, {"source": "jsonl", "uri": "s3://data/d.jsonl", "format": "text"}, "s3://out/x",
                   maxLength=4096, batchSize=4, gradientCheckpointing=True)
    for path, value in over.items():
        node = doc
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    doc.setdefault("resources", {}).setdefault("gpus", 1)
    return api.FineTuneJobSpec.model_validate(doc)


def test_auto_is_16_bit_when_it_fits_with_room_else_4_bit() -> None:
    shape = llama(**LLAMA_8B)
    auto = spec(**{"quantization.bits": "auto"})
    sixteen = memory.estimate(shape, memory.setup_for(auto, 16, varlen=False, on_gpu=True)).need
    assert memory.plan(auto, shape, 80 * memory.GiB, "test", False).bits == 16  # an 8B in bf16 on an 80 GB GPU
    assert memory.plan(auto, shape, int(sixteen * 1.05), "test", False).bits == 4  # fits, but not 10% to spare
    assert memory.plan(auto, shape, 16 * memory.GiB, "test", False).bits == 4
    unknown = memory.plan(auto, shape, None, "unknown", False)
    assert unknown.bits == 4 and unknown.fits and unknown.status()["fits"] is None


def test_a_run_that_cannot_fit_says_what_would() -> None:
    shape = llama(**LLAMA_8B)
    big = spec(**{"quantization.bits": 16, "training.maxLength": 8192, "training.batchSize": 1})
    plan = memory.plan(big, shape, 20 * memory.GiB, "the nvidia.com/gpu.memory label of node a", False)
    assert not plan.fits and plan.bits == 16
    text = memory.refusal(plan)
    assert "at quantization.bits 16" in text and "each GPU has 20.0 GiB (the nvidia.com/gpu.memory label" in text
    assert "quantization.bits 4 (" in text and "training.maxLength" in text
    assert "GPUs with training.distributed fsdp" in text
    for choice in plan.advice:  # every suggestion is itself a plan that fits
        assert float(choice.rsplit("(", 1)[1].split(" GiB")[0].split(": ")[-1]) <= 20.0
    # nothing within reach: a 70B-like shape on a 8 GiB GPU
    huge = llama(**{**LLAMA_8B, "num_hidden_layers": 80, "hidden_size": 8192, "intermediate_size": 28672})
    assert "nothing within reach fits" in memory.refusal(memory.plan(spec(), huge, 8 * memory.GiB, "t", False))


def test_fsdp_divides_the_weights_not_the_activations() -> None:
    shape = llama(**LLAMA_8B)
    one = memory.estimate(shape, memory.Setup(bits=4))
    four = memory.estimate(shape, memory.Setup(bits=4, shards=4))
    assert four.weights < one.weights / 3 and four.activations == one.activations


def test_where_the_gpu_memory_comes_from(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {contract.ENV_GPU_MEMORY_MIB: "16384", contract.ENV_GPU_MEMORY_SOURCE: "node x's label"}
    assert memory.budget(spec(**{"resources.gpuMemory": "80Gi"}), env) == (80 * memory.GiB, "resources.gpuMemory")
    assert memory.budget(spec(), env) == (16 * memory.GiB, "node x's label")
    assert memory.budget(spec(**{"resources.gpus": 0, "resources.memory": "8Gi"}), env)[0] == 8 * memory.GiB
    have, source = memory.budget(spec(), {})
    assert have is None and "no nvidia.com/gpu.memory label" in source  # no GPU on this machine
    assert memory.quantity_bytes("81559Mi") == 81559 * memory.MiB and memory.quantity_bytes("8G") == 8 * 10**9
