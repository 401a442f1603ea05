"""Will it fit? The trainer's peak GPU memory, estimated from the model's config alone, before any
GPU is asked for (docs/trainer.md, "Will it fit?").

    peak = weights + adapter (LoRA weights, gradients, AdamW states) + activations (per token) + mask

* **weights**: the linear layers in 4-bit NF4 (half a byte a weight, plus the quantization
  constants: ~0.127 bit with double quant, 0.5 bit without) or 8-bit (a byte), or 2 bytes in
  16-bit; everything else (embeddings, output head, norms) in 16-bit, up-cast to float32 by
  ``prepare_model_for_kbit_training`` for 4/8-bit training. FSDP divides them by the ranks.
* **adapter**: r x (in + out) for every adapted linear layer, float32 weights and gradients (8
  bytes) plus the optimizer's state (AdamW: 8 bytes; 8-bit AdamW: 2; SGD, Adafactor: ~0).
* **activations**, per token of a micro-batch: with gradient checkpointing, each layer's input
  (float32 in k-bit training: the up-cast embeddings keep the residual stream in float32) plus
  one layer recomputed in the backward pass, 20 hidden-size and 12 intermediate-size values of the
  compute dtype; without it, every layer keeps that much. TRL computes the loss over the output
  head in tiles of 4096 tokens x 32768 vocabulary: nothing the GPU fit can see; on CPU (torch ops,
  no Triton) ~8.3 float32 values a tile cell.
* **mask**: sdpa over a packed (bfd) row builds a dense (tokens x tokens) mask.

The per-token coefficients were fitted on three H100 peaks (``torch.cuda.max_memory_allocated``,
docs/benchmarks.md) and checked on CPU (``bench/memory.py``); :data:`RESERVE` covers what the
allocator does not count (the CUDA context, cuBLAS workspaces, fragmentation).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any

from kubetune import api, contract

log = logging.getLogger("kubetune.memory")

MiB = 2**20
GiB = 2**30
RESERVE = GiB  # CUDA context + workspaces + allocator slack, on top of the estimate
AUTO_MARGIN = 1.10  # bits: auto picks 16-bit only with this much room to spare
HIDDEN_VALUES, INTERMEDIATE_VALUES = 20, 12  # per token, one layer's working set (fitted, see module doc)
# TRL's fused LM head scores [4096 tokens x 32768 vocabulary] tiles, never the whole logits. On a GPU
# (Triton) that adds nothing the fit can see; on CPU (torch ops) a tile costs ~8.3 float32 values a
# cell (fitted on the tiny model, bench/memory.py; the SmolLM2 rows check it).
HEAD_TILE_TOKENS, HEAD_TILE_VOCAB, HEAD_TILE_CPU_BYTES = 4096, 32768, 8.3 * 4
OPTIMIZER_STATE_BYTES = {"adamw_8bit": 2, "paged_adamw_8bit": 2, "sgd": 0, "adafactor": 0}  # else 8 (AdamW)
QUANT_BYTES = {4: 0.5, 8: 1.0, 16: 2.0}
QUANT_CONSTANTS = {True: 0.127 / 8, False: 0.5 / 8}  # bytes a weight: double quant, plain absmax (4-bit)


@dataclass(frozen=True)
class Shape:
    """What the estimate needs from a model's config, counted on an empty (meta) model."""

    linear: int  # weights of the linear layers that are quantized and may be adapted (not the output head)
    other: int  # embeddings, output head, norms, biases
    lora: int  # LoRA weights for spec.lora (r x (in + out) per adapted layer + modulesToSave copies)
    hidden: int
    intermediate: int
    layers: int
    vocab: int


@dataclass(frozen=True)
class Setup:
    """How the run trains, as far as memory goes."""

    bits: int  # 4, 8 or 16
    double_quant: bool = True
    tokens: int = 1024  # tokens in one micro-batch (rows x maxLength)
    row_tokens: int = 1024  # tokens in one attention row (the mask is row_tokens^2 when there is one)
    mask: bool = True  # sdpa over packed rows (no varlen kernel) builds a dense mask
    checkpointing: bool = True
    compute_bytes: int = 2  # bf16/fp16 mixed precision on GPUs; 4 on CPU
    optimizer_state: int = 8
    shards: int = 1  # FSDP ranks sharing the weights
    on_gpu: bool = True


@dataclass(frozen=True)
class Estimate:
    weights: int
    adapter: int
    activations: int
    mask: int

    @property
    def total(self) -> int:
        return self.weights + self.adapter + self.activations + self.mask

    @property
    def need(self) -> int:
        """What the GPU must have: the estimate plus :data:`RESERVE`."""
        return self.total + RESERVE

    def describe(self) -> str:
        return (f"~{gib(self.need)} (weights {gib(self.weights)}, adapter and optimizer {gib(self.adapter)}, "
                f"activations {gib(self.activations + self.mask)}, CUDA and allocator {gib(RESERVE)})")


def gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def estimate(shape: Shape, setup: Setup) -> Estimate:
    kbit = setup.bits in (4, 8)
    if kbit:
        per_weight = QUANT_BYTES[setup.bits] + (QUANT_CONSTANTS[setup.double_quant] if setup.bits == 4 else 0)
        other_bytes = 4 if setup.shards == 1 else setup.compute_bytes  # prepare_model_for_kbit_training up-casts
    else:
        per_weight = other_bytes = 4 if setup.compute_bytes == 4 else 2
    weights = (shape.linear * per_weight + shape.other * other_bytes) / setup.shards
    adapter = shape.lora * (8 + setup.optimizer_state) / setup.shards
    residual = 4 if kbit else setup.compute_bytes
    layer = (HIDDEN_VALUES * shape.hidden + INTERMEDIATE_VALUES * shape.intermediate) * setup.compute_bytes
    per_token = (shape.layers * shape.hidden * residual + layer if setup.checkpointing
                 else shape.layers * (shape.hidden * residual + layer))
    mask = setup.row_tokens ** 2 * 2 * (setup.tokens // max(setup.row_tokens, 1)) if setup.mask else 0
    head = 0 if setup.on_gpu else (min(setup.tokens, HEAD_TILE_TOKENS) * min(shape.vocab, HEAD_TILE_VOCAB)
                                   * HEAD_TILE_CPU_BYTES)
    return Estimate(int(weights), int(adapter), int(per_token * setup.tokens + head), int(mask))


def shape_of(config: Any, lora: api.Lora, trust_remote_code: bool = False) -> Shape:
    """Count a model's weights from its config (``transformers.PretrainedConfig``) on the meta
    device: no memory, no weights read."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    head = model.get_output_embeddings()
    targets = set(lora.target_modules)
    every = "all-linear" in targets
    linear = lora_weights = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        linear += module.weight.numel()
        if every or name.rsplit(".", 1)[-1] in targets or name in targets:
            lora_weights += lora.r * (module.in_features + module.out_features)
    for name in lora.modules_to_save or []:
        lora_weights += sum(p.numel() for n, p in model.named_parameters() if f".{name}." in f".{n}")
    total = sum(p.numel() for p in model.parameters())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    embed = model.get_input_embeddings()
    if (getattr(text, "tie_word_embeddings", False) and head is not None and embed is not None
            and head.weight is not embed.weight):  # tied when loaded, not on the meta device: count once
        total -= head.weight.numel()
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    return Shape(linear=linear, other=total - linear, lora=lora_weights, hidden=hidden,
                 intermediate=int(getattr(text, "intermediate_size", 0) or 4 * hidden),
                 layers=int(getattr(text, "num_hidden_layers", 0) or 0),
                 vocab=int(getattr(text, "vocab_size", 0) or 0))


def setup_for(spec: api.FineTuneJobSpec, bits: int, varlen: bool, on_gpu: bool, shards: int = 1) -> Setup:
    """The Setup of ``spec`` with ``bits``: micro-batches as :func:`kubetune_trainer.sft.micro_batching`
    makes them (one packed row of maxLength with bfd and no varlen kernel)."""
    from kubetune_trainer.sft import micro_batching

    t = spec.training
    rows, _ = micro_batching(t, varlen)
    packed = t.packing in ("bfd", "bfd_split")
    if spec.method != "sft":  # padded: DPO's and ORPO's chosen and rejected, KTO's completions and their KL
        rows, packed = 2 * t.batch_size, False  # mismatches, in one forward (DPO, KTO: the reference's too, no grad)
    return Setup(
        bits=bits, double_quant=spec.quantization.double_quant, tokens=rows * t.max_length,
        row_tokens=rows * t.max_length if packed else t.max_length,
        mask=not varlen and (t.packing != "wrapped" or spec.method != "sft"), checkpointing=t.gradient_checkpointing,
        compute_bytes=2 if on_gpu and t.bf16 else 4,
        optimizer_state=OPTIMIZER_STATE_BYTES.get(t.optimizer, 8), shards=shards, on_gpu=on_gpu,
    )


_UNITS = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18, "m": 1e-3,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes quantity (``80Gi``, ``81559Mi``, ``8e9``) in bytes."""
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", quantity.strip())
    if not match or match.group(2) not in _UNITS:
        raise ValueError(f"not a quantity: {quantity!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def budget(spec: api.FineTuneJobSpec, env: Any = os.environ, device: int = 0) -> tuple[int | None, str]:
    """(bytes each rank may use, where that figure comes from): ``resources.gpuMemory``; else what
    the operator read from the nodes the job may run on (GPU feature discovery's
    ``nvidia.com/gpu.memory`` label, passed in the environment); else this pod's GPU; else, for a
    job without GPUs, its ``resources.memory``; else unknown (None)."""
    if spec.resources.gpu_memory:
        return quantity_bytes(spec.resources.gpu_memory), "resources.gpuMemory"
    if spec.resources.gpus == 0:
        if spec.resources.memory:
            return quantity_bytes(spec.resources.memory), "resources.memory (no GPUs)"
        return None, "unknown (no GPUs and no resources.memory)"
    if env.get(contract.ENV_GPU_MEMORY_MIB):
        return int(env[contract.ENV_GPU_MEMORY_MIB]) * MiB, env.get(contract.ENV_GPU_MEMORY_SOURCE) or "the nodes"
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).total_memory, f"this pod's GPU (cuda:{device})"
    return None, f"unknown (no {contract.GPU_MEMORY_LABEL} label on the GPU nodes and no resources.gpuMemory)"


@dataclass(frozen=True)
class Plan:
    bits: int  # the quantization the run loads the base with (bits: auto resolved)
    estimate: Estimate
    budget: int | None
    source: str
    fits: bool
    advice: list[str]

    def status(self) -> dict[str, Any]:
        """status.memory."""
        return {"bits": self.bits, "estimatedMiB": self.estimate.need // MiB,
                "gpuMemoryMiB": self.budget // MiB if self.budget else None, "gpuMemorySource": self.source,
                "fits": self.fits if self.budget else None}


def plan(spec: api.FineTuneJobSpec, shape: Shape, budget_bytes: int | None, source: str, varlen: bool) -> Plan:
    """Resolve ``quantization.bits: auto`` (16-bit LoRA when it fits with :data:`AUTO_MARGIN` to
    spare: faster than 4-bit; else 4-bit) and say whether the run fits ``budget_bytes``, and if not,
    what would."""
    on_gpu = spec.resources.gpus > 0
    shards = spec.world_size() if spec.training.distributed == "fsdp" else 1

    def need(bits: int, s: api.FineTuneJobSpec = spec, n: int = shards) -> Estimate:
        return estimate(shape, setup_for(s, bits, varlen, on_gpu, n))

    wanted = spec.quantization.bits
    if wanted == "auto":
        sixteen = need(16)
        bits = 16 if budget_bytes is not None and sixteen.need * AUTO_MARGIN <= budget_bytes else 4
    else:
        bits = int(wanted)
    found = need(bits)
    if budget_bytes is None or found.need <= budget_bytes:
        return Plan(bits, found, budget_bytes, source, True, [])
    advice: list[str] = []
    if bits != 4 and need(4).need <= budget_bytes:
        advice.append(f"quantization.bits 4 ({gib(need(4).need)})")
    t = spec.training
    length = t.max_length // 2
    while length >= 256:
        shorter = spec.model_copy(update={"training": t.model_copy(update={"max_length": length})})
        if need(bits, shorter).need <= budget_bytes:
            advice.append(f"training.maxLength {length} ({gib(need(bits, shorter).need)})")
            break
        length //= 2
    if setup_for(spec, bits, varlen, on_gpu).tokens > t.max_length:
        one = spec.model_copy(update={"training": t.model_copy(update={
            "batch_size": 1, "gradient_accumulation_steps": t.batch_size * t.gradient_accumulation_steps})})
        if need(bits, one).need <= budget_bytes:
            advice.append(f"training.batchSize 1 with gradientAccumulationSteps "
                          f"{t.batch_size * t.gradient_accumulation_steps} ({gib(need(bits, one).need)})")
    if not t.gradient_checkpointing:
        on = spec.model_copy(update={"training": t.model_copy(update={"gradient_checkpointing": True})})
        if need(bits, on).need <= budget_bytes:
            advice.append(f"training.gradientCheckpointing true ({gib(need(bits, on).need)})")
    if on_gpu:
        for ranks in (2, 4, 8, 16, 32, 64):
            if ranks > shards and need(bits, n=ranks).need <= budget_bytes:
                advice.append(f"{ranks} GPUs with training.distributed fsdp (resources.gpus x resources.nodes = "
                              f"{ranks}: {gib(need(bits, n=ranks).need)} each)")
                break
    return Plan(bits, found, budget_bytes, source, False, advice)


def refusal(plan_: Plan) -> str:
    """Why the run cannot fit, and what would (the InsufficientGPUMemory message)."""
    what = "GPU" if "no GPUs" not in plan_.source else "pod"
    text = (f"the run needs {plan_.estimate.describe()} of {what} memory at quantization.bits {plan_.bits}, "
            f"but each {what} has {gib(plan_.budget or 0)} ({plan_.source})")
    if plan_.advice:
        return text + "; this would fit: " + "; or ".join(plan_.advice)
    return text + "; nothing within reach fits: a GPU with more memory, or a smaller model"


def with_bits(spec: api.FineTuneJobSpec, bits: int) -> api.FineTuneJobSpec:
    """``spec`` with ``quantization.bits`` resolved."""
    return spec.model_copy(update={"quantization": spec.quantization.model_copy(update={"bits": bits})})


def check(spec: api.FineTuneJobSpec, model_path: str, varlen: bool, device: int = 0) -> Plan:
    """The Plan of ``spec`` for the model at ``model_path`` (its config only), logged; callers raise
    :class:`InsufficientGPUMemory` when it does not fit."""
    from transformers import AutoConfig

    from kubetune_trainer.modeling import hub_kwargs, unloadable

    with unloadable(spec.model):  # no config, or a broken one: InvalidSpec, as when the model loads
        config = AutoConfig.from_pretrained(model_path, **hub_kwargs(spec.model))
        shape = shape_of(config, spec.lora, spec.model.trust_remote_code)
    have, source = budget(spec, device=device)
    result = plan(spec, shape, have, source, varlen)
    wanted = spec.quantization.bits
    log.info("memory: %s at %d-bit%s; %s %s", result.estimate.describe(), result.bits,
             " (quantization.bits auto)" if wanted == "auto" else "",
             "each GPU has" if have else "GPU memory", gib(have) if have else source)
    return result

