"""Preference tuning on the same path (issue #19): method dpo on the tiny model, the prepared pairs,
the row checks, and a DPO run continuing an SFT run's adapter (model.adapterFrom), against the real
S3 server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kubetune_trainer import data, prepare, sft
from kubetune_trainer.runtime import InvalidDataset
from kubetune_trainer.storage import Store
from trainer_helpers import make_pod, pairs, preference_spec, put, qa_rows, recorder, spec_doc

from kubetune import api

pytestmark = pytest.mark.integration


def dpo_spec(tiny: Path, s3: Any, data_uri: str, out: str, **over: Any) -> api.FineTuneJobSpec:
    return preference_spec(tiny, s3, data_uri, out, "dpo", {"beta": 0.1}, **over)


@pytest.mark.parametrize("conversational", [False, True], ids=["text", "messages"])
def test_dpo_learns_the_preference_on_held_out_pairs(conversational: bool, tiny_model_dir: Path, s3: Any,
                                                     prefix: str, tmp_path: Path, store: Store) -> None:
    spec = dpo_spec(tiny_model_dir, s3, put(s3, prefix, "pairs.jsonl", pairs(60, conversational=conversational)),
                    f"s3://{prefix}/dpo")
    ctx = make_pod(tmp_path / "work")
    patches = recorder(ctx)
    result = sft.train(spec, ctx)
    evals = [p["progress"]["evalRewardAccuracy"] for p in patches
             if "evalRewardAccuracy" in (p.get("progress") or {})]
    assert evals, patches[-3:]
    assert evals[-1] > 0.75, evals  # held-out pairs: well above chance (0.5)
    progress = result["progress"]
    assert progress["rewardMargin"] > 0 and progress["rewardChosen"] > progress["rewardRejected"], progress
    manifest = store.get_json(f"s3://{prefix}/dpo/manifest.json")
    assert manifest["data"]["trainingRows"] == 48 and "/.kubetune/prepared/" in manifest["data"]["preparedUri"]
    files = set(store.list(f"s3://{prefix}/dpo/adapter"))
    assert "adapter_config.json" in files and not any(f.startswith("ref/") for f in files), files


def test_dpo_continues_an_sft_adapter(tiny_model_dir: Path, s3: Any, prefix: str, tmp_path: Path,
                                      store: Store) -> None:
    """SFT, then DPO on its adapter (model.adapterFrom.uri): the policy starts from the SFT adapter
    (its first logged rewards are ~0: policy = reference), the published adapter is that adapter
    trained further (same rank and targets), loadable with peft alone."""
    sft_doc = spec_doc({"name": str(tiny_model_dir)},
                       {"source": "jsonl", "uri": put(s3, prefix, "qa.jsonl", qa_rows(16)), "format": "template",
                        "template": "Question: {question}\nAnswer: {answer}"},
                       f"s3://{prefix}/sft", s3.endpoint, maxSteps=4)
    sft_doc["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0, "targetModules": ["q_proj", "v_proj"]}
    sft.train(api.FineTuneJobSpec.model_validate({**sft_doc, "prepare": {"mode": "inline"}}),
              make_pod(tmp_path / "sft"))
    spec = dpo_spec(tiny_model_dir, s3, put(s3, prefix, "pairs.jsonl", pairs(40)), f"s3://{prefix}/dpo",
                    model={"name": str(tiny_model_dir), "adapterFrom": {"uri": f"s3://{prefix}/sft/adapter"}})
    ctx = make_pod(tmp_path / "dpo")
    patches = recorder(ctx)
    sft.train(spec, ctx)
    first = next(p["progress"] for p in patches if "rewardMargin" in (p.get("progress") or {}))
    assert abs(first["rewardMargin"]) < 1e-3, first  # step 1: the policy is the reference
    config = store.get_json(f"s3://{prefix}/dpo/adapter/adapter_config.json")
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["q_proj", "v_proj"], config

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    local = tmp_path / "adapter"
    store.download_dir(f"s3://{prefix}/dpo/adapter", local)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(local))


@pytest.mark.parametrize("row, problem", [
    ({"prompt": "Q?", "chosen": " yes", "rejected": " yes"}, "row 3: chosen and rejected are the same answer"),
    ({"prompt": "Q?", "chosen": "  ", "rejected": " no"}, "row 3 has an empty chosen answer"),
    ({"prompt": "Q?", "chosen": " yes"}, "row 3 has no 'rejected'"),
    ({"prompt": "Q?", "chosen": " yes", "rejected": [{"role": "assistant", "content": "no"}]},
     "row 3 mixes strings and lists of messages"),
    ({"prompt": [{"role": "user", "content": "Q?"}], "chosen": [{"role": "user", "content": "yes"}],
      "rejected": [{"role": "assistant", "content": "no"}]}, "row 3: chosen must start with an assistant message"),
])
def test_bad_pairs_fail_before_training_naming_the_row(row: dict[str, Any], problem: str, tiny_model_dir: Path,
                                                       s3: Any, prefix: str, tmp_path: Path, store: Store) -> None:
    rows = pairs(8)
    rows[3] = row
    spec = dpo_spec(tiny_model_dir, s3, put(s3, prefix, "bad.jsonl", rows), f"s3://{prefix}/bad")
    with pytest.raises(InvalidDataset, match=problem.replace("?", r"\?")):
        sft.train(spec, make_pod(tmp_path / "work"))


def test_a_prompt_too_long_is_named(tiny_model_dir: Path, s3: Any, prefix: str, tmp_path: Path, store: Store) -> None:
    rows = pairs(8)
    rows[5]["prompt"] = "Question: " + " ".join(["apple"] * 80) + "?\nAnswer:"
    spec = dpo_spec(tiny_model_dir, s3, put(s3, prefix, "long.jsonl", rows), f"s3://{prefix}/long")
    with pytest.raises(InvalidDataset, match=r"1 of \d+ prompts are longer than 63 tokens .*rows \d"):
        sft.train(spec, make_pod(tmp_path / "work"))


def test_method_and_format_go_together() -> None:
    base = spec_doc({"name": "m"}, {"source": "jsonl", "uri": "s3://data/p.jsonl", "format": "preference"},
                    "s3://out/x")
    with pytest.raises(ValueError, match="dataset.format preference and feedback are preference data: set method"):
        api.FineTuneJobSpec.model_validate(base)  # method sft on preference data
    with pytest.raises(ValueError, match="method dpo trains on dataset.format preference"):
        api.FineTuneJobSpec.model_validate({**base, "method": "dpo", "dataset": {**base["dataset"], "format": "text"}})
    with pytest.raises(ValueError, match="spec.dpo configures method dpo"):
        api.FineTuneJobSpec.model_validate({**base, "dataset": {**base["dataset"], "format": "text"},
                                            "dpo": {"beta": 0.2}})
    with pytest.raises(ValueError, match="set exactly one of fineTuneJobRef and uri"):
        api.FineTuneJobSpec.model_validate({**base, "method": "dpo", "model": {"name": "m", "adapterFrom": {}}})
    assert api.FineTuneJobSpec.model_validate({**base, "method": "dpo"}).dpo_settings().beta == 0.1


def test_pairs_tokenize_as_trl_does(tiny_model_dir: Path) -> None:
    """The prepared pairs are what DPOTrainer's own tokenization makes of the same rows."""
    import datasets
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = pairs(6)
    ours = data.tokenize(datasets.Dataset.from_list([{**r, "conversational": "text"} for r in rows]), tokenizer)
    config = DPOConfig(output_dir="/tmp/x", max_length=None, use_cpu=True, bf16=False)
    theirs = DPOTrainer._prepare_dataset(type("T", (), {"_tokenizer": tokenizer})(), datasets.Dataset.from_list(rows),
                                         tokenizer, config, "train")
    for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert ours[name] == theirs[name]
    assert prepare.token_count(ours) == sum(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"]))
                                            for r in ours)
