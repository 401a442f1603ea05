"""The merge recipe's pure functions: source resolution, fingerprints, tolerances, result sizing; the
adapter file summary."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from kubetune_trainer import merge as merge_recipe
from kubetune_trainer import merge_lora, merge_verify
from kubetune_trainer.runtime import InvalidAdapter, VerificationFailed, fit_result, write_termination_message
from merge_helpers import build_adapter

from kubetune import api, contract

ADAPTER = "s3://models/run-1/adapter"


def manifest(model: dict[str, str] | None) -> dict[str, object]:
    spec = {"model": model} if model is not None else {}
    return {"spec": spec, "files": {"adapter_config.json": "ab", "adapter_model.safetensors": "cd"}}


def source(**fields: object) -> api.ModelSource:
    return api.ModelSource.model_validate(fields)


def test_base_defaults_to_the_adapter_manifest_model() -> None:
    base = merge_recipe.resolve_base(None, manifest({"name": "HuggingFaceTB/SmolLM2-135M", "revision": "v1"}),
                                     ADAPTER)
    assert (base.name, base.revision) == ("HuggingFaceTB/SmolLM2-135M", "v1")


def test_given_base_must_be_the_trained_one() -> None:
    trained = manifest({"uri": "s3://models/bases/llama/"})
    assert merge_recipe.resolve_base(source(uri="s3://models/bases/llama"), trained, ADAPTER).uri == \
        "s3://models/bases/llama"  # a trailing slash is the same folder
    with pytest.raises(InvalidAdapter, match=r"trained on s3://models/bases/llama/, not on source\.baseModel "
                                             r"s3://models/bases/mistral"):
        merge_recipe.resolve_base(source(uri="s3://models/bases/mistral"), trained, ADAPTER)
    with pytest.raises(InvalidAdapter, match="not on source.baseModel org/model"):
        merge_recipe.resolve_base(source(name="org/model"), trained, ADAPTER)


def test_revisions_must_agree_when_both_are_named() -> None:
    trained = manifest({"name": "org/model", "revision": "abc"})
    with pytest.raises(InvalidAdapter, match=r"trained on org/model@abc, not on source\.baseModel org/model@def"):
        merge_recipe.resolve_base(source(name="org/model", revision="def"), trained, ADAPTER)
    given = source(name="org/model", secretRef={"name": "hf-token"})
    base = merge_recipe.resolve_base(given, trained, ADAPTER)
    assert base.revision == "abc" and base.secret_ref is not None  # trained revision, user's token


def test_manifest_without_a_model_needs_an_explicit_base() -> None:
    with pytest.raises(InvalidAdapter, match="names no base model"):
        merge_recipe.resolve_base(None, manifest(None), ADAPTER)
    assert merge_recipe.resolve_base(source(name="org/model"), manifest(None), ADAPTER).name == "org/model"
    with pytest.raises(InvalidAdapter, match="invalid spec.model"):
        merge_recipe.resolve_base(None, manifest({"name": "a", "uri": "s3://bkt/x"}), ADAPTER)


def spec(**fields: object) -> api.MergeJobSpec:
    return api.MergeJobSpec.model_validate({"source": {"adapterUri": ADAPTER}, "output": {"uri": "s3://out/m"},
                                            **fields})


def test_fingerprint_changes_with_what_changes_the_merged_model() -> None:
    base = source(name="org/model")
    first = merge_recipe.source_fingerprint(spec(), ADAPTER, base, manifest(None))
    assert first == merge_recipe.source_fingerprint(spec(), ADAPTER, base, manifest(None))
    retrained = {**manifest(None), "files": {"adapter_model.safetensors": "ef"}}
    assert first != merge_recipe.source_fingerprint(spec(), ADAPTER, base, retrained)
    assert first != merge_recipe.source_fingerprint(spec(dtype="float16"), ADAPTER, base, manifest(None))
    assert first != merge_recipe.source_fingerprint(spec(), ADAPTER, source(name="org/other"), manifest(None))
    assert first != merge_recipe.source_fingerprint(spec(verify={"prompts": ["hi"]}), ADAPTER, base, manifest(None))
    json.dumps(first)  # stored in the manifest as is


def test_check_refuses_differences_above_tolerance_and_nan() -> None:
    merge_verify.check(1e-5, 1e-4, "m")
    with pytest.raises(VerificationFailed, match=r"m differs from base\+adapter by 0\.002 in the logits "
                                                 r"\(tolerance 0\.0001\): nothing was published"):
        merge_verify.check(2e-3, 1e-4, "m")
    with pytest.raises(VerificationFailed, match="by nan"):
        merge_verify.check(float("nan"), 1e-4, "m")


def test_default_tolerance_scales_with_the_logits_and_the_spec_overrides_it() -> None:
    """The dtype's relative tolerance times the largest |logit| (at least 1); a spec's own value wins."""
    logits = torch.tensor([[3.0, -40.0], [0.5, 2.0]])
    assert merge_verify.tolerance(logits, "bfloat16", None) == (40.0, pytest.approx(2.5e-2 * 40))
    assert merge_verify.tolerance(logits, "float32", None) == (40.0, pytest.approx(1e-4 * 40))
    assert merge_verify.tolerance(logits * 1e-3, "float16", None) == (1.0, pytest.approx(4e-3))  # scale >= 1
    assert merge_verify.tolerance(logits, "bfloat16", 1e-9) == (40.0, 1e-9)


def test_result_fits_the_termination_message(tmp_path: Path) -> None:
    """32 prompts of long outputs still give a termination message that keeps every sample."""
    samples = [{"prompt": f"prompt {i} " + "p" * 500, "output": "o" * 4000} for i in range(32)]
    result = merge_recipe.result_from_manifest({
        "mergedUri": "s3://out/m", "adapterUri": ADAPTER, "samples": samples,
        "verification": {"maxLogitDiff": 0.01, "tolerance": 0.1, "passed": True},
    })
    path = tmp_path / "termination-log"
    write_termination_message(path, "Completed", "MergeJob finished in 12345s", result)
    written = json.loads(path.read_text())
    assert len(path.read_bytes()) <= contract.TERMINATION_MESSAGE_LIMIT
    assert written["result"]["mergedUri"] == "s3://out/m" and written["result"]["verification"]["passed"] is True
    assert len(written["result"]["samples"]) == 32 and written["result"]["samples"][0]["prompt"].startswith("prompt 0")


def test_short_results_are_left_alone() -> None:
    result = {"mergedUri": "s3://o/m", "samples": [{"prompt": "hi", "output": "hello"}]}
    assert fit_result(result, 4000) == result
    long = {"mergedUri": "s3://o/m", "samples": [{"prompt": "hi", "output": "x" * 5000}] * 3}
    fitted = fit_result(long, 3000)
    assert len(json.dumps(fitted).encode()) <= 3000 and len(fitted["samples"]) == 3
    assert fitted["samples"][0]["output"].endswith("…")


def test_a_trainer_result_keeps_its_samples_in_the_termination_message(tmp_path: Path) -> None:
    """write_termination_message shortens samples itself (the same fit_result), whoever made the result."""
    result = {"mergedUri": "s3://out/m", "samples": [{"prompt": "p" * 300, "output": "o" * 3000}] * 8}
    path = tmp_path / "termination-log"
    write_termination_message(path, "Completed", "done", result)
    written = json.loads(path.read_text())
    assert len(path.read_bytes()) <= contract.TERMINATION_MESSAGE_LIMIT
    assert written["message"] == "done" and written["result"]["mergedUri"] == "s3://out/m"
    assert len(written["result"]["samples"]) == 8 and written["result"]["samples"][0]["output"].startswith("ooo")


def test_adapter_file_is_summarised_and_an_untrained_one_reported(tiny_model_dir: Path, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """PEFT initialises lora_B to zero: such an adapter changes nothing, which the warning says."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    trained = merge_lora.AdapterFile.read(build_adapter(tiny_model_dir, tmp_path / "trained", r=4,
                                                        target_modules=["q_proj"]))
    assert trained is not None and not trained.untrained
    q_proj = {k: v for k, v in trained.shapes.items() if "layers.0.self_attn.q_proj" in k}
    assert sorted(q_proj.values()) == [(4, 64), (64, 4)]  # lora_A [r, in], lora_B [out, r]

    untrained_dir = tmp_path / "untrained"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                   LoraConfig(target_modules=["q_proj"])).save_pretrained(untrained_dir)
    untrained = merge_lora.AdapterFile.read(untrained_dir)
    assert untrained is not None and untrained.untrained
    with caplog.at_level(logging.WARNING, logger="kubetune.merge"):
        trained.warn_if_untrained()
        assert caplog.text == ""
        untrained.warn_if_untrained()
    assert "every lora_B weight of the adapter is zero" in caplog.text
    assert merge_lora.AdapterFile.read(tmp_path) is None  # no adapter_model.safetensors (e.g. a .bin adapter)
