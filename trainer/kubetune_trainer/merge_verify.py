"""Verification for the MergeJob recipe (:mod:`kubetune_trainer.merge`): is the merged model base+adapter?

* :func:`probe_inputs` — fixed probe texts (prose, code) plus the first verify prompts in the chat
  template, as one right-padded batch.
* :func:`logits` — the logits of every probe token in one forward pass, in float32 arithmetic over the
  dtype's weights (:func:`float32_compute`), so bf16 noise cannot hide a broken merge.
* :func:`check` — the merged model's logits against base+adapter (unmerged) within the tolerance
  (``REL_TOLERANCE[dtype]`` x the logit scale, unless the spec sets one).
* :func:`generate_samples` — greedy generations for ``spec.verify.prompts``.
* :func:`write_model_card` — the merged model's README.md: what it was made from, how it was checked.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from kubetune import api
from kubetune_trainer.runtime import VerificationFailed

if TYPE_CHECKING:
    import torch

log = logging.getLogger("kubetune.merge")

# Default tolerance = REL_TOLERANCE[dtype] x the logit scale (largest |logit| on the probes, >= 1).
# Both sides are computed in float32 (see float32_compute) from the weights in the dtype, so what
# differs is the merged weight W + s*B@A rounded to the dtype (the reference keeps the LoRA in
# float32). Measured on SmolLM2-135M (30 layers, logit scale 44) with all-linear r=16 adapters that
# move the logits by up to 3.0 and 0.53: max diff float32 1.2e-4 (2.8e-6 of the scale), float16
# 0.047-0.057 (1.3e-3), bfloat16 0.26-0.41 (9.4e-3: bf16 keeps 8 significant bits). The defaults
# leave a 2.5-35x margin over those and stay well below the 3.0 effect of a trained-size adapter.
REL_TOLERANCE = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 2.5e-2}

# Fixed probe inputs: prose, code, and (when given) the verify prompts in the chat template.
PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog, and then the dog wakes up.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Kubernetes schedules pods onto nodes; a Job runs its pods until they complete.",
)
PROBE_MAX_TOKENS = 64
PROBE_PROMPTS = 3  # verify prompts also used as logit probes


class Probes(NamedTuple):
    """The probe inputs as one batch, padded on the right."""

    ids: torch.Tensor  # [probes, longest]
    mask: torch.Tensor  # 1 on each probe's own tokens, 0 on padding

    @property
    def tokens(self) -> int:
        return int(self.mask.sum())


def probe_inputs(tokenizer: Any, prompts: list[str]) -> Probes:
    """Token ids of the fixed probe texts, plus the first verify prompts as chat turns."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    texts = [(t, True) for t in PROBE_TEXTS] + [(_chat(tokenizer, p), False) for p in prompts[:PROBE_PROMPTS]]
    rows = [torch.tensor(tokenizer(text, add_special_tokens=special, truncation=True,
                                   max_length=PROBE_MAX_TOKENS)["input_ids"]) for text, special in texts]
    masks = [torch.ones_like(row) for row in rows]
    return Probes(pad_sequence(rows, batch_first=True), pad_sequence(masks, batch_first=True))


def _chat(tokenizer: Any, prompt: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True))
    return prompt


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def logits(model: Any, probes: Probes) -> torch.Tensor:
    """Logits of every probe token [tokens, vocab], computed in float32, kept on the CPU.

    One forward pass for all probes: the padding follows each probe's tokens, so causal attention
    keeps it out of them (and the mask out of everything).
    """
    import torch

    device = _device(model)
    with torch.no_grad(), float32_compute(model):
        out = model(input_ids=probes.ids.to(device), attention_mask=probes.mask.to(device)).logits
    return out[probes.mask.to(out.device).bool()].float().cpu()


@contextlib.contextmanager
def float32_compute(model: Any) -> Iterator[None]:
    """Run forward passes in float32 while the weights stay in their dtype (one module upcast at a time).

    In bfloat16 arithmetic two equivalent computations of SmolLM2 already differ by as much as a mild
    adapter changes the logits, so a bf16-computed check could not tell a merged model from its
    base. Computed in float32, the check sees what the merge really changed: the merged weights
    rounded to the dtype. Costs one module's float32 copy at a time, never a second model.
    """
    import torch

    modules = [m for m in model.modules()
               if any(p is not None and p.is_floating_point() and p.dtype != torch.float32
                      for p in m._parameters.values())]
    saved: dict[int, dict[str, Any]] = {}

    def upcast(module: Any, args: Any) -> None:
        saved[id(module)] = dict(module._parameters)
        for name, param in module._parameters.items():
            if param is not None and param.is_floating_point() and param.dtype != torch.float32:
                module._parameters[name] = param.detach().float()

    def restore(module: Any, args: Any, output: Any) -> None:
        module._parameters.update(saved.pop(id(module)))

    handles = [h for m in modules for h in (m.register_forward_pre_hook(upcast), m.register_forward_hook(restore))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module in modules:  # after an exception inside a forward
            if id(module) in saved:
                module._parameters.update(saved.pop(id(module)))


def tolerance(reference: torch.Tensor, dtype: str, given: float | None) -> tuple[float, float]:
    """(logit scale, tolerance): ``given`` when the spec sets one, else REL_TOLERANCE[dtype] x the scale."""
    scale = max(1.0, float(reference.abs().max()))
    return scale, given or REL_TOLERANCE[dtype] * scale


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def check(diff: float, tolerance: float, what: str) -> None:
    if not diff <= tolerance:  # NaN fails too
        raise VerificationFailed(
            f"{what} differs from base+adapter by {diff:.4g} in the logits (tolerance {tolerance:.4g}): "
            "nothing was published"
        )


def generate_samples(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int) -> list[dict[str, str]]:
    """Greedy generations for the verify prompts (chat template when the tokenizer has one)."""
    import torch

    config = copy.deepcopy(model.generation_config)
    config.do_sample, config.temperature, config.top_p, config.top_k = False, None, None, None
    config.max_new_tokens = max_new_tokens
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    samples = []
    for prompt in prompts:
        enc = tokenizer(_chat(tokenizer, prompt), add_special_tokens=not getattr(tokenizer, "chat_template", None),
                        return_tensors="pt").to(_device(model))
        # On the CPU, float32 arithmetic is both faster than emulated bf16/fp16 and closer to the weights.
        compute = float32_compute(model) if _device(model).type == "cpu" else contextlib.nullcontext()
        with torch.no_grad(), compute:
            out = model.generate(**enc, generation_config=config)
        text = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        samples.append({"prompt": prompt, "output": text.strip()})
    return samples


def describe(model: api.ModelSource) -> str:
    """A model source as users name it: hub id or s3:// folder, ``@revision`` when one is set."""
    return model.display() + (f"@{model.revision}" if model.revision else "")


def write_model_card(out: Path, base: api.ModelSource, adapter_uri: str, dtype: str,
                     verification: dict[str, Any], adapter_manifest: dict[str, Any]) -> None:
    """The merged model's README.md: Hub card metadata, then what it was made from (base, adapter,
    the adapter's training data and run fingerprint) and how it was verified."""
    trained = adapter_manifest.get("spec") or {}
    data = trained.get("dataset") or {}
    lines = ["---"]
    if base.name:
        lines.append(f"base_model: {json.dumps(base.name)}")
    lines += ["library_name: transformers", "tags: [kubetune, lora, merged]", "---", "",
              "# Merged model", "",
              f"Base model `{describe(base)}` with the LoRA adapter `{adapter_uri}` merged in (merge-and-unload), "
              f"saved in {dtype} by kubetune.", "",
              "| | |", "|---|---|",
              f"| base model | `{describe(base)}` |",
              f"| adapter | `{adapter_uri}` |"]
    if data:
        lines.append(f"| training data | `{data.get('uri', '?')}` ({data.get('source', '?')}, "
                     f"format {data.get('format', 'text')}) |")
    if adapter_manifest.get("fingerprint"):
        lines.append(f"| training run fingerprint | `{adapter_manifest['fingerprint']}` |")
    passed = "passed" if verification.get("passed") else "FAILED"
    lines += [f"| verification | {passed}: largest logit difference to base+adapter on the probe inputs "
              f"{verification['maxLogitDiff']:.3g} (tolerance {verification['tolerance']:.3g}) |", "",
              "Load it with `AutoModelForCausalLM.from_pretrained(<this folder>)`; it needs no PEFT.", ""]
    (out / "README.md").write_text("\n".join(lines))
