"""Packing as the trainer really runs it: TRL's own dataset preparation and collator, the 4-bit
model and the attention implementation the recipe loads on CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from kubetune_trainer import data, modeling, sft
from trainer_helpers import QA

from kubetune import api

MAX_LENGTH = 64


def build_trainer(model_dir: Path, packing: str, tmp_path: Path, n: int = 24, max_length: int = MAX_LENGTH) -> Any:
    import datasets
    from trl import SFTTrainer

    source = api.ModelSource(name=str(model_dir))
    training = api.Training(maxSteps=2, maxLength=max_length, batchSize=4, packing=packing,
                            gradientCheckpointing=False)
    tokenizer = modeling.load_tokenizer(str(model_dir), source)
    model = modeling.load_model(str(model_dir), source, api.Quantization(), gradient_checkpointing=False)
    texts = [f"Question: {q}\nAnswer: {a}" for q, a in QA[:n]]
    tokenized = data.tokenize(datasets.Dataset.from_dict({"text": texts}), tokenizer)
    trainer = SFTTrainer(model=model, args=sft.sft_config(training, tmp_path / "t", False, False, None),
                         train_dataset=tokenized, processing_class=tokenizer,
                         peft_config=modeling.lora_config(api.Lora(r=8, dropout=0.0)))
    sft.adapter_in_float32(trainer.model)
    trainer.model.eval()
    return trainer


def first_batch(trainer: Any) -> dict[str, Any]:
    return next(iter(trainer.get_train_dataloader()))


@torch.no_grad()
def test_bfd_packed_samples_do_not_attend_to_each_other(tiny_model_dir: Path, tmp_path: Path) -> None:
    # bfd trains one packed row of maxLength per micro-batch (sft.micro_batching): make it hold several samples
    trainer = build_trainer(tiny_model_dir, "bfd", tmp_path, max_length=4 * MAX_LENGTH)
    model = trainer.model
    assert model.config._attn_implementation == "sdpa"
    assert getattr(model.get_base_model(), "is_loaded_in_4bit", False)
    batch = first_batch(trainer)
    assert "attention_mask" not in batch  # TRL's padding-free batch: position_ids restart per sample
    bounds = batch["cu_seq_lens_q"].tolist()
    assert len(bounds) > 3, "several samples must share the packed row"
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    packed = model(**inputs).logits[0]

    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        alone = model(input_ids=batch["input_ids"][:, start:end]).logits[0]
        torch.testing.assert_close(packed[start:end], alone, atol=1e-4, rtol=1e-4)

    # The check can fail: the same row with positions that do not restart (samples attending to
    # earlier samples, as in classic packing) gives different logits after the first sample.
    flat = torch.arange(batch["input_ids"].shape[1])[None]
    leaky = model(input_ids=batch["input_ids"], position_ids=flat).logits[0]
    s, e = bounds[1], bounds[2]
    alone = model(input_ids=batch["input_ids"][:, s:e]).logits[0]
    assert (leaky[s:e] - alone).abs().max() > 1e-2


def test_wrapped_fills_every_row_to_max_length(tiny_model_dir: Path, tmp_path: Path) -> None:
    trainer = build_trainer(tiny_model_dir, "wrapped", tmp_path)
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    assert len(lengths) >= 3
    assert all(n == MAX_LENGTH for n in lengths[:-1]) and 0 < lengths[-1] <= MAX_LENGTH
    batch = first_batch(trainer)
    assert batch["input_ids"].shape == (4, MAX_LENGTH)
    assert bool(batch["attention_mask"].all())  # one causal sequence per row: samples see each other


@pytest.mark.parametrize("packing", ["none"])
def test_no_packing_pads_one_sample_per_row(packing: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    trainer = build_trainer(tiny_model_dir, packing, tmp_path)
    assert len(trainer.train_dataset) == 24
    batch = first_batch(trainer)
    assert batch["input_ids"].shape[0] == 4
    assert not bool(batch["attention_mask"].all())  # padded to the longest sample of the batch
    assert bool((batch["labels"][batch["attention_mask"] == 0] == -100).all())
