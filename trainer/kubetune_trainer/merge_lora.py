"""The LoRA side of the MergeJob recipe (:mod:`kubetune_trainer.merge`): load an adapter onto its base, merge it.

* :class:`AdapterFile` — what the recipe needs from ``adapter_model.safetensors`` (names, shapes,
  whether every ``lora_B`` is zero), read in one pass.
* :func:`load_adapter` — ``PeftModel.from_pretrained``, after growing the vocabulary when the adapter
  saved resized embeddings, refusing an adapter whose weights do not all fit the base.
* :func:`merge` — PEFT's ``merge_and_unload(safe_merge=True)``, after untying an adapted tied embedding.

One path for every adapter PEFT can load (plain LoRA, rsLoRA, DoRA, ``modules_to_save``, embeddings,
tied weights). A hand-written merge for plain LoRAs (``DirectLora``) was measured on a 1B model and
removed: it saved only the ~4 s of importing PEFT and wrapping the layers, and the whole merge was
not faster with it (docs/benchmarks.md, "Merge").
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune import api
from kubetune_trainer.runtime import InvalidAdapter, VerificationFailed

log = logging.getLogger("kubetune.merge")

WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class AdapterFile:
    """The saved adapter weights as the recipe checks them: tensor names and shapes, and whether
    every ``lora_B`` is zero (then the LoRA layers change nothing). Read once, tensors not kept."""

    shapes: dict[str, tuple[int, ...]]
    untrained: bool

    @classmethod
    def read(cls, adapter_dir: Path) -> AdapterFile | None:
        """None for an adapter saved without safetensors (``.bin``): PEFT still loads it, unchecked."""
        from safetensors import safe_open

        path = adapter_dir / WEIGHTS
        if not path.is_file():
            return None
        with safe_open(str(path), "pt") as fh:
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
            factors = [k for k in shapes if ".lora_B" in k or ".lora_embedding_B" in k]
            untrained = bool(factors) and not any(fh.get_tensor(k).any() for k in factors)
        return cls(shapes, untrained)

    def warn_if_untrained(self) -> None:
        """Every lora_B zero: the check cannot tell the merged model from its base. Read from the
        weights: no forward pass."""
        if self.untrained:
            log.warning("every lora_B weight of the adapter is zero: its LoRA layers change nothing (an "
                        "untrained adapter?)")


def load_adapter(model: Any, adapter_dir: Path, base: api.ModelSource, weights: AdapterFile | None) -> Any:
    """``PeftModel.from_pretrained``, refusing adapters whose weights do not all fit the base."""
    from peft import PeftModel, get_peft_model_state_dict

    if weights is not None:
        resize_for_adapter(model, weights)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            peft_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()
        raise InvalidAdapter(f"the adapter does not fit the base model {base.display()}: "
                             f"{' '.join(line.strip() for line in first[:3])[:600]}") from err
    missing = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    expected = set(get_peft_model_state_dict(peft_model).keys())
    unexpected = sorted(set(weights.shapes) - expected) if weights is not None else []
    if missing or unexpected:
        detail = missing[0][:300] if missing else f"weights for modules the base does not have: {unexpected[:3]}"
        raise InvalidAdapter(f"the adapter does not fit the base model {base.display()}: {detail}")
    return peft_model.eval()


def resize_for_adapter(model: Any, weights: AdapterFile) -> None:
    """Grow the base's vocabulary when the adapter was trained with added tokens (saved embeddings)."""
    name = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    keys = {f"base_model.model.{name}.weight", f"base_model.model.{name}.base_layer.weight"}
    rows = {shape[0] for key, shape in weights.shapes.items() if key in keys}
    current = model.get_input_embeddings().weight.shape[0]
    if len(rows) == 1 and (wanted := rows.pop()) != current:
        log.info("the adapter was trained with %d token embeddings (base: %d): resizing", wanted, current)
        model.resize_token_embeddings(wanted)


def merge(peft_model: Any) -> Any:
    """PEFT's ``merge_and_unload(safe_merge=True)``, after untying an adapted tied embedding."""
    untie_adapted_embeddings(peft_model)
    try:
        return peft_model.merge_and_unload(safe_merge=True, progressbar=False)
    except ValueError as err:  # safe_merge found NaNs
        raise VerificationFailed(f"merging produced invalid weights: {err}") from err


def untie_adapted_embeddings(peft_model: Any) -> None:
    """Give lm_head its own weight when it shares it with an adapted embedding (or vice versa).

    Merging a LoRA on ``embed_tokens`` in place would otherwise change the tied ``lm_head`` too,
    which the unmerged model never did. (PEFT already unties for ``modules_to_save``; with
    ``ensure_weight_tying`` the adapter is meant for both and they stay tied.)
    """
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = peft_model.get_base_model()
    config = peft_model.peft_config[peft_model.active_adapter]
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is None or getattr(config, "ensure_weight_tying", False):
        return
    inp_layer = inp.get_base_layer() if isinstance(inp, BaseTunerLayer) else inp
    out_layer = out.get_base_layer() if isinstance(out, BaseTunerLayer) else out
    tied = inp_layer.weight is out_layer.weight
    adapted = isinstance(inp, BaseTunerLayer) or isinstance(out, BaseTunerLayer)
    if tied and adapted:
        log.info("untying lm_head from the adapted input embeddings before merging")
        out_layer.weight = torch.nn.Parameter(inp_layer.weight.detach().clone(), requires_grad=False)
        for cfg in (model.config, getattr(model.config, "text_config", None)):
            if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
                cfg.tie_word_embeddings = False
