"""Method orpo (issue #19): supervised and preference tuning in one run, on the tiny model against
the real S3 server; the prepared pairs in ORPOTrainer's layout, as its own tokenization makes them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from kubetune_trainer import data, sft
from kubetune_trainer.runtime import InvalidDataset
from kubetune_trainer.storage import Store
from trainer_helpers import make_pod, pairs, preference_spec, put, recorder, spec_doc

from kubetune import api

pytestmark = pytest.mark.integration


def orpo_spec(tiny: Path, s3: Any, data_uri: str, out: str, **over: Any) -> api.FineTuneJobSpec:
    return preference_spec(tiny, s3, data_uri, out, "orpo", {"beta": 0.5}, **over)


@pytest.mark.parametrize("conversational", [False, True], ids=["text", "messages"])
def test_orpo_learns_the_preference_on_held_out_pairs(conversational: bool, tiny_model_dir: Path, s3: Any,
                                                      prefix: str, tmp_path: Path, store: Store) -> None:
    """From the base (no SFT run, no reference model): the held-out pairs' chosen answers end up
    likelier than the rejected ones, the supervised part of the loss falls, and the report and
    manifest name the method."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = orpo_spec(tiny_model_dir, s3, put(s3, prefix, "pairs.jsonl", pairs(60, conversational=conversational)),
                     f"s3://{prefix}/orpo")
    ctx = make_pod(tmp_path / "work")
    patches = recorder(ctx)
    result = sft.train(spec, ctx)
    progress = [p["progress"] for p in patches if "progress" in p]
    evals = [p["evalRewardAccuracy"] for p in progress if "evalRewardAccuracy" in p]
    assert evals and evals[-1] > 0.75, evals  # held-out pairs: well above chance (0.5)
    final = result["progress"]
    assert final["rewardMargin"] > 0 and final["logOddsRatio"] > 0, final
    manifest = store.get_json(f"s3://{prefix}/orpo/manifest.json")
    # it is SFT on the chosen answers too: their loss falls below the random model's (a uniform guess:
    # log of the vocabulary, 10.8; measured 9.9 after 24 steps)
    assert manifest["metrics"]["finalNllLoss"] < math.log(len(AutoTokenizer.from_pretrained(tiny_model_dir))) - 0.5
    assert manifest["metrics"]["finalEvalRewardAccuracy"] == evals[-1], manifest["metrics"]
    assert manifest["data"]["trainingRows"] == 48
    assert "orpo (beta 0.5)" in store.get_text(f"s3://{prefix}/orpo/report.md")
    local = tmp_path / "adapter"
    store.download_dir(f"s3://{prefix}/orpo/adapter", local)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(local))


def test_orpo_reuses_the_pairs_dpo_prepared(tiny_model_dir: Path, s3: Any, prefix: str, tmp_path: Path,
                                            store: Store) -> None:
    """ORPO trains on DPO's prepared pairs: after a DPO job on the same data and tokenizer, an ORPO
    job tokenizes nothing; its own settings still make it another run (its own fingerprint)."""
    uri = put(s3, prefix, "pairs.jsonl", pairs(20))
    short = {"maxSteps": 2, "maxLength": 64, "batchSize": 2}
    dpo = preference_spec(tiny_model_dir, s3, uri, f"s3://{prefix}/dpo", "dpo", {"beta": 0.1}, training=short)
    sft.train(dpo, make_pod(tmp_path / "dpo"))
    spec = orpo_spec(tiny_model_dir, s3, uri, f"s3://{prefix}/orpo", training=short)
    ctx = make_pod(tmp_path / "orpo")
    patches = recorder(ctx)
    sft.train(spec, ctx)
    stages = [p["stage"] for p in patches if "stage" in p]
    assert not any("tokenizing" in s for s in stages), stages
    dpo_data = store.get_json(f"s3://{prefix}/dpo/manifest.json")["data"]
    orpo_manifest = store.get_json(f"s3://{prefix}/orpo/manifest.json")
    assert orpo_manifest["data"]["preparedUri"] == dpo_data["preparedUri"]
    assert orpo_manifest["fingerprint"] != store.get_json(f"s3://{prefix}/dpo/manifest.json")["fingerprint"]
    assert orpo_manifest["fingerprintInputs"]["orpo"] == {"beta": 0.5}, orpo_manifest["fingerprintInputs"]


def test_a_prompt_too_long_for_orpo_is_named(tiny_model_dir: Path, s3: Any, prefix: str, tmp_path: Path,
                                             store: Store) -> None:
    rows = pairs(8)
    rows[2]["prompt"] = "Question: " + " ".join(["apple"] * 30) + "?\nAnswer:"
    spec = orpo_spec(tiny_model_dir, s3, put(s3, prefix, "long.jsonl", rows), f"s3://{prefix}/long",
                     orpo={"maxPromptLength": 24})
    with pytest.raises(InvalidDataset, match=r"1 of \d+ prompts are longer than 24 tokens \(orpo.maxPromptLength"):
        sft.train(spec, make_pod(tmp_path / "work"))


def test_orpo_rows_are_orpo_trainers_own_tokenization(tiny_model_dir: Path) -> None:
    """The prepared pairs, in ORPO's layout (sft.orpo_rows), against ORPOTrainer.tokenize_row on the
    same text pairs, one answer cut at maxLength: the same sequences, labels and masks, except the
    BOS token that the experimental trainer puts before every prompt whether or not the tokenizer
    adds one itself (SmolLM2's does not: its bos_token is <|im_start|>; docs/methods.md)."""
    import datasets
    from transformers import AutoTokenizer
    from trl.experimental.orpo import ORPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = pairs(6)
    rows[4]["chosen"] = " yes " + "please " * 40 + "thank you."  # cut at max_length
    max_length = 32
    ours = sft.orpo_rows(data.tokenize(datasets.Dataset.from_list([{**r, "conversational": "text"} for r in rows]),
                                       tokenizer), max_length)
    # the experimental trainer's BOS takes one place of its max_length: give it one more
    theirs = type("T", (), {"processing_class": tokenizer, "is_encoder_decoder": False, "max_length": max_length + 1,
                            "build_tokenized_answer": ORPOTrainer.build_tokenized_answer})()
    for row, mine in zip(rows, ours, strict=True):
        expected = ORPOTrainer.tokenize_row(theirs, row)
        assert expected["prompt_input_ids"][0] == tokenizer.bos_token_id != mine["prompt_input_ids"][0]
        assert set(mine) == {k for k in expected if k.startswith(("prompt_", "chosen_", "rejected_"))}
        for key, value in mine.items():
            assert value == expected[key][1:], (key, value, expected[key])
    assert len(ours[4]["chosen_input_ids"]) == max_length and ours[4]["chosen_labels"][-1] != -100


def test_method_settings_default_per_method() -> None:
    """spec.method_settings(): the method's settings, defaults when unset (what the fingerprint, the
    checks and the trainer config read); none for sft. The refusals are tests/manifests.py's
    METHOD_CASES, run by tests/test_api.py and against the real API server."""
    base = spec_doc({"name": "m"}, {"source": "jsonl", "uri": "s3://data/p.jsonl", "format": "preference"},
                    "s3://out/x")
    assert api.FineTuneJobSpec.model_validate({**base, "method": "orpo"}).method_settings() == api.Orpo(beta=0.1)
    assert api.FineTuneJobSpec.model_validate(
        {**base, "method": "dpo", "dpo": {"beta": 0.3}}).method_settings() == api.Dpo(beta=0.3)
    sft_doc = {**base, "dataset": {**base["dataset"], "format": "text"}}
    assert api.FineTuneJobSpec.model_validate(sft_doc).method_settings() is None


def test_orpo_continues_an_sft_adapter(tiny_model_dir: Path, s3: Any, prefix: str, tmp_path: Path,
                                       store: Store) -> None:
    """model.adapterFrom with orpo: the policy continues that adapter (its rank and targets); ORPO
    has no reference, so nothing else is kept."""
    sft_doc = spec_doc({"name": str(tiny_model_dir)},
                       {"source": "jsonl", "uri": put(s3, prefix, "qa.jsonl", pairs(8)), "format": "promptCompletion",
                        "promptField": "prompt", "completionField": "chosen"},
                       f"s3://{prefix}/sft", s3.endpoint, maxSteps=2)
    sft_doc.update(lora={"r": 4, "alpha": 8, "dropout": 0.0, "targetModules": ["q_proj"]}, prepare={"mode": "inline"})
    sft.train(api.FineTuneJobSpec.model_validate(sft_doc), make_pod(tmp_path / "sft"))
    spec = orpo_spec(tiny_model_dir, s3, put(s3, prefix, "pairs.jsonl", pairs(10)), f"s3://{prefix}/orpo",
                     model={"name": str(tiny_model_dir), "adapterFrom": {"uri": f"s3://{prefix}/sft/adapter"}},
                     training={"maxSteps": 2, "maxLength": 64, "batchSize": 2})
    sft.train(spec, make_pod(tmp_path / "orpo"))
    config = store.get_json(f"s3://{prefix}/orpo/adapter/adapter_config.json")
    assert config["r"] == 4 and config["target_modules"] == ["q_proj"], config
    assert sorted(store.list(f"s3://{prefix}/orpo/adapter")) == sorted(store.list(f"s3://{prefix}/sft/adapter"))
