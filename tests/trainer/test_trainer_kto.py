"""Method kto (issue #19): KTO on the tiny model from feedback rows (prompt, completion, label) and
from preference pairs split in two, the prepared rows against TRL's own tokenization, and the row
checks, against the real S3 server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from kubetune_trainer import data, fingerprint, sft
from kubetune_trainer.runtime import InvalidDataset
from kubetune_trainer.storage import Store
from trainer_helpers import make_pod, pairs, preference_spec, put, recorder, spec_doc

from kubetune import api

pytestmark = pytest.mark.integration


def feedback(n: int, seed: int = 0, conversational: bool = False) -> list[dict[str, Any]]:
    """The preference of :func:`pairs` as single completions: the polite answer labelled desirable,
    the rude one not, alternating rows (the order KTO sees them in is its own, shuffled)."""
    rows = []
    for i, pair in enumerate(pairs(n, seed, conversational)):
        good = i % 2 == 0
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen" if good else "rejected"], "label": good})
    return rows


def kto_spec(tiny: Path, s3: Any, data_uri: str, out: str, fmt: str = "feedback", max_steps: int = 24,
             **over: Any) -> api.FineTuneJobSpec:
    return preference_spec(tiny, s3, data_uri, out, "kto", {"beta": 0.1}, fmt, max_steps, **over)


def test_kto_learns_from_feedback(tiny_model_dir: Path, s3: Any, prefix: str, tmp_path: Path, store: Store) -> None:
    """Held-out completions: the desirable (polite) ones end up rewarded above the undesirable (rude)."""
    spec = kto_spec(tiny_model_dir, s3, put(s3, prefix, "feedback.jsonl", feedback(80)), f"s3://{prefix}/kto")
    ctx = make_pod(tmp_path / "work")
    patches = recorder(ctx)
    result = sft.train(spec, ctx)
    margins = [p["progress"]["evalRewardMargin"] for p in patches
               if "evalRewardMargin" in (p.get("progress") or {})]
    assert margins and margins[-1] > 0.5, margins
    progress = result["progress"]
    assert "kl" in progress and progress["rewardChosen"] > progress["rewardRejected"], progress
    reported = next(p["data"] for p in patches if "data" in p)
    assert reported["trainingRows"] == 64 and 24 <= reported["desirableSamples"] <= 40, reported  # of 40, 16 held out
    report = store.get_text(f"s3://{prefix}/kto/report.md") or ""
    assert "| method | kto (beta 0.1, loss kto" in report and "- finalEvalRewardMargin:" in report
    files = set(store.list(f"s3://{prefix}/kto/adapter"))
    assert "adapter_config.json" in files and not any(f.startswith("ref/") for f in files), files


def test_kto_on_preference_pairs_trains_each_answer(tiny_model_dir: Path, s3: Any, prefix: str, tmp_path: Path,
                                                    store: Store) -> None:
    """Pairs become a desirable and an undesirable row each (TRL's unpairing); the conversational
    kind goes through the chat template."""
    spec = kto_spec(tiny_model_dir, s3, put(s3, prefix, "pairs.jsonl", pairs(30, conversational=True)),
                    f"s3://{prefix}/kto-pairs", fmt="preference", max_steps=4)
    ctx = make_pod(tmp_path / "work")
    patches = recorder(ctx)
    sft.train(spec, ctx)
    reported = next(p["data"] for p in patches if "data" in p)
    assert (reported["trainingRows"], reported["desirableSamples"]) == (48, 24), reported


def test_feedback_rows_tokenize_as_trl_does(tiny_model_dir: Path) -> None:
    """The prepared rows are what KTOTrainer's own tokenization makes of the same rows (and of the
    same pairs, unpaired)."""
    import datasets
    from transformers import AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    trainer = type("T", (), {"_tokenizer": tokenizer, "calculate_KL": False, "desirable_weight": 1.0,
                             "undesirable_weight": 1.0})()
    config = KTOConfig(output_dir="/tmp/x", max_length=None, use_cpu=True, bf16=False)
    for rows, unpaired in ((feedback(6), False), (pairs(6), True)):
        source = datasets.Dataset.from_list([{**r, "conversational": "text"} for r in rows])
        ours = data.tokenize(source, tokenizer, unpaired=unpaired)
        theirs = KTOTrainer._prepare_dataset(trainer, datasets.Dataset.from_list(rows), tokenizer, config, "train")
        for name in ("prompt_ids", "completion_ids", "label"):
            assert ours[name] == theirs[name], name
        assert ours["row"] == (list(range(6)) * 2 if unpaired else list(range(6)))


@pytest.mark.parametrize("row, problem", [
    ({"prompt": "Q?", "completion": " yes", "label": "yes"},
     "column 'label' (dataset.labelField) must hold true or false: row 3 is str 'yes'"),
    ({"prompt": "Q?", "completion": "  ", "label": True}, "row 3 has an empty completion answer"),
    ({"prompt": "Q?", "label": True}, "row 3 has no 'completion'"),
    ({"prompt": [{"role": "user", "content": "Q?"}], "completion": [{"role": "user", "content": "yes"}],
      "label": False}, "row 3: completion must start with an assistant message"),
])
def test_bad_feedback_fails_before_training_naming_the_row(row: dict[str, Any], problem: str, tiny_model_dir: Path,
                                                           s3: Any, prefix: str, tmp_path: Path,
                                                           store: Store) -> None:
    rows = feedback(8)
    rows[3] = row
    spec = kto_spec(tiny_model_dir, s3, put(s3, prefix, "bad.jsonl", rows), f"s3://{prefix}/bad")
    with pytest.raises(InvalidDataset, match=problem.replace("?", r"\?").replace("(", r"\(").replace(")", r"\)")):
        sft.train(spec, make_pod(tmp_path / "work"))


def test_one_label_only_and_long_prompts_are_refused(tiny_model_dir: Path, s3: Any, prefix: str,
                                                     tmp_path: Path, store: Store) -> None:
    same = [{**r, "label": True} for r in feedback(10)]
    spec = kto_spec(tiny_model_dir, s3, put(s3, prefix, "same.jsonl", same), f"s3://{prefix}/same")
    with pytest.raises(InvalidDataset, match="all 8 training rows are labelled true: KTO learns from desirable and"):
        sft.train(spec, make_pod(tmp_path / "same"))
    rows = feedback(10)
    rows[6]["prompt"] = "Question: " + " ".join(["apple"] * 80) + "?\nAnswer:"
    spec = kto_spec(tiny_model_dir, s3, put(s3, prefix, "long.jsonl", rows), f"s3://{prefix}/long",
                    dataset={"source": "jsonl", "uri": f"s3://{prefix}/long.jsonl", "format": "feedback"})
    with pytest.raises(InvalidDataset, match=r"1 of 10 prompts are longer than 63 tokens .*training split rows 6;"):
        sft.train(spec, make_pod(tmp_path / "long"))


def test_method_kto_is_validated() -> None:
    base = spec_doc({"name": "m"}, {"source": "jsonl", "uri": "s3://data/f.jsonl", "format": "feedback"},
                    "s3://out/x", batchSize=4)
    with pytest.raises(ValueError, match="dataset.format preference and feedback are preference data: set method"):
        api.FineTuneJobSpec.model_validate(base)
    with pytest.raises(ValueError, match="method dpo trains on dataset.format preference"):
        api.FineTuneJobSpec.model_validate({**base, "method": "dpo"})
    with pytest.raises(ValueError, match="method kto trains on dataset.format feedback"):
        api.FineTuneJobSpec.model_validate({**base, "method": "kto", "dataset": {**base["dataset"], "format": "text"}})
    with pytest.raises(ValueError, match="spec.kto configures method kto"):
        api.FineTuneJobSpec.model_validate({**base, "method": "dpo", "kto": {},
                                            "dataset": {**base["dataset"], "format": "preference"}})
    one = {**base, "method": "kto", "training": {**base["training"], "batchSize": 1}}
    with pytest.raises(ValueError, match="set training.batchSize to 2 or more"):
        api.FineTuneJobSpec.model_validate(one)
    assert api.FineTuneJobSpec.model_validate({**one, "kto": {"lossType": "apo_zero_unpaired"}}).method == "kto"
    with pytest.raises(ValueError, match="greater than 0"):
        api.FineTuneJobSpec.model_validate({**base, "method": "kto", "kto": {"desirableWeight": 0}})


def test_method_settings_and_the_continued_adapter_count_in_the_fingerprint(s3: Any, prefix: str,
                                                                            store: Store) -> None:
    sft_doc = spec_doc({"name": "m"}, {"source": "jsonl", "uri": "s3://data/d.jsonl"}, "s3://out/x")
    assert "method" not in fingerprint.spec_inputs(api.FineTuneJobSpec.model_validate(sft_doc))  # as before
    doc = {**sft_doc, "method": "kto", "dataset": {**sft_doc["dataset"], "format": "feedback"}}
    base = api.FineTuneJobSpec.model_validate(doc)
    assert fingerprint.spec_inputs(base)["kto"]["beta"] == 0.1
    other = api.FineTuneJobSpec.model_validate({**doc, "kto": {"beta": 0.5}})
    assert fingerprint.differences(fingerprint.spec_inputs(base), fingerprint.spec_inputs(other)) == [
        "kto.beta (0.1 there, 0.5 here)"]
    adapter = put(s3, prefix, "adapter/adapter_config.json", [{"r": 4}])
    chained = api.FineTuneJobSpec.model_validate(
        {**doc, "model": {"name": "m", "adapterFrom": {"uri": adapter.rsplit("/", 1)[0]}}})
    before = fingerprint.run_inputs(chained, store)
    put(s3, prefix, "adapter/adapter_config.json", [{"r": 8}])
    after = fingerprint.run_inputs(chained, store)
    assert before["adapterContent"] and fingerprint.differences(before, after) == [
        "the continued adapter's content (the files at model.adapterFrom.uri changed)"]
    assert "adapterContent" not in fingerprint.run_inputs(base, store)
    json.dumps(before)  # stored in the manifest as it is


def test_preference_and_feedback_from_parquet(tmp_path: Path, dataset_spec: Any, store: Store) -> None:
    """Parquet, as users export it: message lists as structs (the nulls Arrow adds are dropped), labels
    as booleans or 0/1 integers."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = pairs(4, conversational=True)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    splits = data.load_splits(dataset_spec(source="parquet", uri=str(tmp_path / "pairs.parquet"), format="preference"),
                              store, tmp_path / "work", seed=0)
    assert [json.loads(c) for c in splits.train["chosen"]] == [r["chosen"] for r in rows]
    assert set(splits.train["conversational"]) == {"messages"}
    for labels in ([True, False, True, False], [1, 0, 1, 0]):
        table = [{"prompt": r["prompt"], "completion": r["chosen"], "label": label}
                 for r, label in zip(rows, labels, strict=True)]
        pq.write_table(pa.Table.from_pylist(table), tmp_path / "feedback.parquet")
        splits = data.load_splits(dataset_spec(source="parquet", uri=str(tmp_path / "feedback.parquet"),
                                               format="feedback"), store, tmp_path / "work", seed=0)
        assert splits.train["label"] == [True, False, True, False]
