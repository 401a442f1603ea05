"""DirectLora (the merge without PEFT) against PEFT itself, on real adapters saved by PEFT.

For every plain LoRA it takes, the unmerged logits and the merged weights must be PEFT's, bit for
bit; every adapter it cannot apply exactly must be left to PEFT.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from kubetune_trainer import merge as merge_recipe
from merge_helpers import build_adapter

PLAIN_LORAS = {
    "all-linear": {},
    "rslora-q-v": {"r": 4, "lora_alpha": 12, "use_rslora": True, "target_modules": ["q_proj", "v_proj"]},
    "one-layer-mlp": {"r": 2, "lora_alpha": 5, "target_modules": ["down_proj", "up_proj"], "layers_to_transform": [1]},
}


def load(model_dir: Path, dtype: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()


def random_probes(vocab: int) -> merge_recipe.Probes:
    """Two token rows, the second one padded: the batch the recipe checks with."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return merge_recipe.Probes(ids, mask)


def assert_same_as_peft(base_dir: Path, adapter_dir: Path, dtype: str) -> None:
    from peft import PeftModel

    model = load(base_dir, dtype)
    lora = merge_recipe.DirectLora.read(adapter_dir, model)
    assert lora is not None
    peft_model = PeftModel.from_pretrained(load(base_dir, dtype), adapter_dir).eval()
    probes = random_probes(model.config.vocab_size)

    with lora.applied(model):
        unmerged = merge_recipe.logits(model, probes)
    assert torch.equal(unmerged, merge_recipe.logits(peft_model, probes))
    assert not torch.equal(unmerged, merge_recipe.logits(model, probes))  # the hooks are gone, the base is back

    ours = lora.merge_into(model).state_dict()
    theirs = peft_model.merge_and_unload(safe_merge=True).state_dict()
    assert ours.keys() == theirs.keys()
    original = load(base_dir, dtype).state_dict()
    changed = [k for k in ours if not torch.equal(ours[k], original[k])]
    assert changed, "the merge changed nothing"
    assert all(ours[k].dtype == getattr(torch, dtype) for k in changed)
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("lora", PLAIN_LORAS.values(), ids=PLAIN_LORAS.keys())
def test_plain_lora_merges_exactly_as_peft(tiny_model_dir: Path, tmp_path: Path, dtype: str,
                                           lora: dict[str, Any]) -> None:
    adapter = build_adapter(tiny_model_dir, tmp_path / "adapter", **lora)
    assert_same_as_peft(tiny_model_dir, adapter, dtype)


def test_conv1d_layers_merge_transposed_as_peft(tmp_path: Path) -> None:
    """GPT-2 keeps its projections as Conv1D (weight [in, out], fan_in_fan_out in PEFT)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=2, n_head=4)).save_pretrained(base)
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["c_attn", "c_proj", "c_fc"],
                            fan_in_fan_out=True)
    assert_same_as_peft(base, adapter, "float32")


@pytest.mark.parametrize(("lora", "reason"), [
    ({"use_dora": True}, "it sets use_dora"),
    ({"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, "it sets modules_to_save"),
    ({"target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 4}}, "it sets rank_pattern"),
    ({"target_modules": ["q_proj"], "lora_bias": True}, "it sets lora_bias"),
    ({"target_modules": ["embed_tokens", "q_proj"]}, "it saves base_model.model.model.embed_tokens."),
    ({"target_modules": ["q_proj"], "init_lora_weights": "gaussian"}, "init_lora_weights is 'gaussian'"),
], ids=["dora", "modules-to-save", "rank-pattern", "lora-bias", "embedding", "init"])
def test_other_adapters_are_left_to_peft(tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                         lora: dict[str, Any], reason: str) -> None:
    adapter = build_adapter(tiny_model_dir, tmp_path / "adapter", **lora)
    with caplog.at_level(logging.INFO, logger="kubetune.merge"):
        assert merge_recipe.DirectLora.read(adapter, load(tiny_model_dir, "float32")) is None
    assert f"loading the adapter with PEFT: {reason}" in caplog.text


def test_tied_lm_head_and_bin_adapters_are_left_to_peft(tied_base_dir: Path, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """Merging into lm_head in place would also change the embeddings it shares its weight with
    (PEFT saves lm_head's base weight then; without it, the tie itself is noticed)."""
    from safetensors.torch import load_file, save_file

    tied = build_adapter(tied_base_dir, tmp_path / "tied", target_modules=["lm_head", "q_proj"])
    weights = tied / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if ".lora_" in k}, weights)
    with caplog.at_level(logging.INFO, logger="kubetune.merge"):
        assert merge_recipe.DirectLora.read(tied, load(tied_base_dir, "float32")) is None
    assert "the weight of lm_head is tied to another module or offloaded" in caplog.text

    pickled = tmp_path / "bin"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_bytes((tied / "adapter_config.json").read_bytes())
    with caplog.at_level(logging.INFO, logger="kubetune.merge"):
        assert merge_recipe.DirectLora.read(pickled, load(tied_base_dir, "float32")) is None
    assert "no adapter_model.safetensors" in caplog.text


def test_adapter_whose_factors_do_not_fit_is_left_to_peft(tiny_model_dir: Path, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """PEFT then refuses it with its own size-mismatch message (test_merge_failures.py)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    narrow = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64,
                                                          num_hidden_layers=2, num_attention_heads=4,
                                                          num_key_value_heads=2))
    adapter = build_adapter(tiny_model_dir, tmp_path / "adapter")
    with caplog.at_level(logging.INFO, logger="kubetune.merge"):
        assert merge_recipe.DirectLora.read(adapter, narrow) is None
    assert "do not fit its shape" in caplog.text


def test_an_untrained_adapter_is_reported(tiny_model_dir: Path, tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    """PEFT initialises lora_B to zero: such an adapter changes nothing, which the warning says."""
    from peft import LoraConfig, get_peft_model

    untrained = tmp_path / "untrained"
    get_peft_model(load(tiny_model_dir, "float32"), LoraConfig(target_modules=["q_proj"])).save_pretrained(untrained)
    with caplog.at_level(logging.WARNING, logger="kubetune.merge"):
        merge_recipe.warn_if_untrained(build_adapter(tiny_model_dir, tmp_path / "trained"))
        assert caplog.text == ""
        merge_recipe.warn_if_untrained(untrained)
    assert "every lora_B weight of the adapter is zero" in caplog.text
