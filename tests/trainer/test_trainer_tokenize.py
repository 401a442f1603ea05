"""data.tokenize is TRL's own tokenization, done once and batched: SFTTrainer fed our tokenized split
trains on exactly the rows (input_ids and labels, after truncation or packing) it builds from the raw one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kubetune_trainer import data
from trainer_helpers import QA, marked

MAX_LENGTH = 48


def raw_split(fmt: str) -> Any:
    import datasets

    if fmt == "text":
        rows = {"text": [f"Question: {q}\nAnswer: {a} " * (1 + i % 4) for i, (q, a) in enumerate(QA[:16])]}
    elif fmt == "promptCompletion":
        # half the prompts end in a space that merges with the completion's first word: the tokenized
        # prompt is then not a prefix of the tokenized whole, and the loss starts where they diverge
        rows = {"prompt": [f"Q: {q} " * (1 + i % 5) + "A:" + " " * (i % 2) for i, (q, _) in enumerate(QA[:16])],
                "completion": [" " * (1 - i % 2) + f"Yes, {a}" * (1 + i % 3) for i, (_, a) in enumerate(QA[:16])]}
    else:
        rows = {"messages": [
            [{"role": "system", "content": "Be brief."}] * (i % 2)
            + [{"role": "user", "content": q}, {"role": "assistant", "content": a * (1 + i % 4)}]
            + [{"role": "user", "content": "And twice?"}, {"role": "assistant", "content": a + a}] * (i % 3)
            for i, (q, a) in enumerate(QA[:16])]}
    return datasets.Dataset.from_dict(rows)


def prepared_rows(model: Any, tokenizer: Any, dataset: Any, packing: str, assistant_only: bool) -> list[dict[str, Any]]:
    """What SFTTrainer trains on: its prepared train_dataset, as plain rows."""
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir="/tmp/unused", use_cpu=True, report_to="none", max_length=MAX_LENGTH,
                     packing=packing != "none", **({"packing_strategy": packing} if packing != "none" else {}),
                     assistant_only_loss=assistant_only)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    return [{k: row[k] for k in ("input_ids", "labels", "seq_lengths") if k in row} for row in trainer.train_dataset]


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))


@pytest.mark.parametrize("fmt,assistant_only", [("text", False), ("promptCompletion", False),
                                                ("messages", False), ("messages", True)])
@pytest.mark.parametrize("packing", ["none", "bfd"])
def test_tokenized_split_trains_exactly_what_trl_builds(fmt: str, assistant_only: bool, packing: str, model: Any,
                                                        tokenizer: Any) -> None:
    tok = marked(tokenizer) if assistant_only else tokenizer
    raw = raw_split(fmt)
    ours = data.tokenize(raw, tok, assistant_only=assistant_only)
    assert ours.column_names == ["input_ids", "labels"]
    expected = prepared_rows(model, tok, raw, packing, assistant_only)
    got = prepared_rows(model, tok, ours, packing, assistant_only=False)  # the labels already carry the masks
    assert got == expected
    trained = sum(label != -100 for row in expected for label in row["labels"])
    untrained = sum(label == -100 for row in expected for label in row["labels"])
    assert trained > 0 and (untrained > 0) == (fmt == "promptCompletion" or assistant_only)
    if packing == "none":  # check_tokens counts exactly the tokens TRL trains on
        stats = data.check_tokens(ours, MAX_LENGTH, packing, assistant_only, max_truncated_fraction=1)
        assert stats.trainable == trained
        untruncated = sum(label != -100 for row in ours for label in row["labels"])
        assert stats.truncated_trainable == untruncated - trained  # exactly the trained tokens TRL cut off
        assert stats.truncated_samples == sum(len(row["input_ids"]) > MAX_LENGTH for row in ours)


def test_worker_processes_give_the_same_split(tokenizer: Any) -> None:
    raw = raw_split("promptCompletion")
    one = data.tokenize(raw, tokenizer, workers=1)
    two = data.tokenize(raw, tokenizer, workers=2)
    assert one.to_dict() == two.to_dict()
