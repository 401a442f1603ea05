"""Dataset sources and formats against real files, a real S3 server and real Deep Lake/datasets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from kubetune_trainer import data
from kubetune_trainer.runtime import InvalidDataset
from trainer_helpers import QA, qa_rows, write_jsonl

TEMPLATE = "Question: {question}\n\nAnswer: {answer}"
MESSAGES = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in QA[:12]]


def load(spec: Any, store: Any, tmp_path: Path, seed: int = 0) -> data.Splits:
    return data.load_splits(spec, store, tmp_path / "work", seed)


# -- formats ----------------------------------------------------------------------------------


def test_text_format_uses_text_field_only(tmp_path: Path, dataset_spec: Any, store: Any) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"body": f"doc {i}", "other": i} for i in range(5)])
    splits = load(dataset_spec(source="jsonl", uri=str(path), textField="body"), store, tmp_path)
    assert splits.train.column_names == ["text"]
    assert splits.train["text"] == [f"doc {i}" for i in range(5)]
    assert splits.eval is None


def test_template_format_is_prepare_sample_text(tmp_path: Path, qa_jsonl: Path, dataset_spec: Any,
                                                store: Any) -> None:
    splits = load(dataset_spec(source="jsonl", uri=str(qa_jsonl), format="template", template=TEMPLATE),
                  store, tmp_path)
    assert splits.train["text"][3] == f"Question: {QA[3][0]}\n\nAnswer: {QA[3][1]}"


def test_prompt_completion_format(tmp_path: Path, dataset_spec: Any, store: Any) -> None:
    path = write_jsonl(tmp_path / "pc.jsonl", [{"q": q, "a": a} for q, a in QA[:6]])
    spec = dataset_spec(source="jsonl", uri=str(path), format="promptCompletion", promptField="q",
                        completionField="a")
    splits = load(spec, store, tmp_path)
    assert splits.train.column_names == ["prompt", "completion"]
    assert splits.train[0] == {"prompt": QA[0][0], "completion": QA[0][1]}


def test_messages_format_accepts_lists_and_json_strings(tmp_path: Path, dataset_spec: Any, store: Any) -> None:
    rows = [{"conv": m} for m in MESSAGES[:3]] + [{"conv": json.dumps(MESSAGES[3])}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    splits = load(dataset_spec(source="jsonl", uri=str(path), format="messages", messagesField="conv"),
                  store, tmp_path)
    assert splits.train.column_names == ["messages"]  # each conversation a JSON string (data.conversation_columns)
    assert json.loads(splits.train["messages"][3]) == MESSAGES[3]


def test_template_rows_with_an_empty_answer_are_named(tmp_path: Path, dataset_spec: Any, store: Any) -> None:
    rows = qa_rows(12)
    for i in (2, 4, 5, 6, 8, 9, 11):
        rows[i] = {**rows[i], "answer": "" if i % 2 else "  \n"}
    spec = dataset_spec(source="jsonl", uri=str(write_jsonl(tmp_path / "qa.jsonl", rows)), format="template",
                        template=TEMPLATE)
    with pytest.raises(InvalidDataset) as err:
        load(spec, store, tmp_path)
    assert str(err.value) == (
        "7 of 12 rows have an empty 'answer', the last field of dataset.template (what each row teaches), and "
        "would train on the bare template: rows 2, 4, 5, 6, 8 (and 2 more); fill the 'answer' values or remove "
        "these rows")


def test_template_rows_with_an_empty_prompt_part_still_train(tmp_path: Path, dataset_spec: Any,
                                                             store: Any) -> None:
    """Alpaca's layout: ``input`` is empty in most rows; only the last field (the answer) must be filled."""
    rows = [{"instruction": q, "input": "" if i % 3 else "context", "output": a} for i, (q, a) in enumerate(QA[:9])]
    template = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
    spec = dataset_spec(source="jsonl", uri=str(write_jsonl(tmp_path / "alpaca.jsonl", rows)), format="template",
                        template=template)
    assert load(spec, store, tmp_path).train["text"] == [template.format(**row) for row in rows]


def test_empty_texts_are_dropped_not_trained(tmp_path: Path, dataset_spec: Any, store: Any) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "  "}, {"text": "b"}])
    assert load(dataset_spec(source="jsonl", uri=str(path)), store, tmp_path).train["text"] == ["a", "b"]


def test_eval_fraction_is_seeded_and_disjoint(tmp_path: Path, qa_jsonl: Path, dataset_spec: Any,
                                             store: Any) -> None:
    spec = dataset_spec(source="jsonl", uri=str(qa_jsonl), format="template", template=TEMPLATE,
                        eval={"fraction": 0.25})
    a, b = load(spec, store, tmp_path, seed=1), load(spec, store, tmp_path, seed=1)
    assert (len(a.train), len(a.eval)) == (30, 10)
    assert a.eval["text"] == b.eval["text"]
    assert not set(a.eval["text"]) & set(a.train["text"])


# -- sources ----------------------------------------------------------------------------------


def test_jsonl_on_s3_file_and_split_folder(tmp_path: Path, s3: Any, prefix: str, dataset_spec: Any,
                                           store: Any) -> None:
    client, (bucket, key) = s3.client(), prefix.split("/", 1)
    client.put_object(Bucket=bucket, Key=f"{key}/one.jsonl", Body=json.dumps({"text": "solo"}) + "\n")
    splits = load(dataset_spec(source="jsonl", uri=f"s3://{prefix}/one.jsonl"), store, tmp_path / "a")
    assert splits.train["text"] == ["solo"]

    for split, n in (("train", 5), ("validation", 2)):
        body = "".join(json.dumps({"text": f"{split} {i}"}) + "\n" for i in range(n))
        client.put_object(Bucket=bucket, Key=f"{key}/folder/{split}.jsonl", Body=body)
    spec = dataset_spec(source="jsonl", uri=f"s3://{prefix}/folder", eval={"split": "validation"})
    splits = load(spec, store, tmp_path / "b")
    assert splits.train["text"] == [f"train {i}" for i in range(5)]
    assert splits.eval["text"] == ["validation 0", "validation 1"]


def _parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_parquet_local_and_on_s3(tmp_path: Path, s3: Any, prefix: str, dataset_spec: Any, store: Any) -> None:
    local = _parquet(tmp_path / "pq" / "train-00000-of-00002.parquet", qa_rows(10))
    _parquet(tmp_path / "pq" / "train-00001-of-00002.parquet", qa_rows(15)[10:])
    _parquet(tmp_path / "pq" / "test-00000-of-00001.parquet", qa_rows(20)[15:])
    spec = dataset_spec(source="parquet", uri=str(local.parent), format="template", template=TEMPLATE,
                        eval={"split": "test"})
    splits = load(spec, store, tmp_path / "a")
    assert (len(splits.train), len(splits.eval)) == (15, 5)

    s3.upload_dir(local.parent, *prefix.split("/", 1))
    spec = dataset_spec(source="parquet", uri=f"s3://{prefix}", format="template", template=TEMPLATE)
    splits = load(spec, store, tmp_path / "b")
    assert len(splits.train) == 15  # only the train-* shards
    assert splits.train["text"][0] == TEMPLATE.format(**qa_rows(1)[0])


def test_huggingface_save_to_disk_local_and_on_s3(tmp_path: Path, s3: Any, prefix: str, dataset_spec: Any,
                                                  store: Any) -> None:
    import datasets

    folder = tmp_path / "hf"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list(qa_rows(12)),
        "test": datasets.Dataset.from_list(qa_rows(16)[12:]),
    }).save_to_disk(str(folder))
    spec = dataset_spec(source="huggingface", uri=str(folder), format="template", template=TEMPLATE,
                        eval={"split": "test"})
    splits = load(spec, store, tmp_path / "a")
    assert (len(splits.train), len(splits.eval)) == (12, 4)

    s3.upload_dir(folder, *prefix.split("/", 1))
    spec = dataset_spec(source="huggingface", uri=f"s3://{prefix}", format="template", template=TEMPLATE,
                        eval={"split": "test"})
    splits = load(spec, store, tmp_path / "b")
    assert splits.eval["text"] == [TEMPLATE.format(**row) for row in qa_rows(16)[12:]]


def _deeplake(uri: str, creds: dict[str, str] | None = None) -> None:
    import deeplake

    ds = deeplake.create(uri, creds=creds)
    ds.add_column("question", deeplake.types.Text())
    ds.add_column("answer", deeplake.types.Text())
    ds.add_column("turns", deeplake.types.Dict())
    rows = qa_rows(8)
    ds.append({"question": [r["question"] for r in rows], "answer": [r["answer"] for r in rows],
               "turns": [{"m": m} for m in MESSAGES[:8]]})
    ds.commit()


def test_deeplake_local_and_on_s3(tmp_path: Path, s3: Any, prefix: str, dataset_spec: Any, store: Any) -> None:
    _deeplake(f"file://{tmp_path / 'dl'}")
    spec = dataset_spec(source="deeplake", uri=str(tmp_path / "dl"), format="template", template=TEMPLATE)
    assert load(spec, store, tmp_path / "a").train["text"] == [TEMPLATE.format(**r) for r in qa_rows(8)]

    _deeplake(f"s3://{prefix}/dl", creds=data.deeplake_creds(store))
    spec = dataset_spec(source="deeplake", uri=f"s3://{prefix}/dl", format="promptCompletion",
                        promptField="question", completionField="answer", eval={"fraction": 0.25})
    splits = load(spec, store, tmp_path / "b")
    assert (len(splits.train), len(splits.eval)) == (6, 2)
    assert set(splits.train["prompt"]) | set(splits.eval["prompt"]) == {q for q, _ in QA[:8]}


# -- token-level checks ------------------------------------------------------------------------


def test_check_tokens_counts_trainable_tokens(tmp_path: Path, dataset_spec: Any, store: Any,
                                             tokenizer: Any) -> None:
    rows = [{"prompt": "x " * 10, "completion": "y " * 5}] * 3 + [{"prompt": "a", "completion": "b"}]
    path = write_jsonl(tmp_path / "pc.jsonl", rows)
    spec = dataset_spec(source="jsonl", uri=str(path), format="promptCompletion")
    ds = load(spec, store, tmp_path).train
    tokenized = data.tokenize(ds, tokenizer)
    full = data.check_tokens(tokenized, max_length=64, packing="bfd")
    assert full.trainable < full.tokens and full.too_long == 0
    cut = data.check_tokens(tokenized, max_length=12, packing="bfd", max_truncated_fraction=1)  # prompts ~10 tokens
    assert cut.too_long == 3 and 0 < cut.trainable < full.trainable
    assert cut.trainable + cut.truncated_trainable == full.trainable  # what is not trained is what was cut


def _tokenized(rows: list[tuple[int, int]]) -> Any:
    """A tokenized split of (tokens, trailing trained tokens) rows: the rest of each row is prompt (-100)."""
    import datasets

    return datasets.Dataset.from_dict({"input_ids": [list(range(1, n + 1)) for n, _ in rows],
                                       "labels": [[-100] * (n - t) + list(range(n - t + 1, n + 1)) for n, t in rows]})


@pytest.mark.parametrize("packing", ["bfd", "none"])
def test_truncated_samples_and_tokens_are_counted(packing: str) -> None:
    rows = [(10, 4)] * 18 + [(20, 4), (30, 25)]  # two of 20 samples over maxLength=16
    stats = data.check_tokens(_tokenized(rows), max_length=16, packing=packing, max_truncated_fraction=0.1)
    assert (stats.samples, stats.tokens, stats.too_long) == (20, 230, 2)
    assert (stats.truncated_samples, stats.truncated_tokens, stats.truncated_trainable) == (2, 4 + 14, 4 + 14)
    assert stats.trainable == 18 * 4 + 0 + 11  # the 20-token row loses all its 4 trained tokens


@pytest.mark.parametrize("packing", ["wrapped", "bfd_split"])
def test_packings_that_keep_every_token_truncate_nothing(packing: str) -> None:
    rows = [(10, 4)] * 2 + [(40, 40)] * 8  # most samples over maxLength: fine, they are split
    stats = data.check_tokens(_tokenized(rows), max_length=16, packing=packing, max_truncated_fraction=0)
    assert (stats.too_long, stats.truncated_samples, stats.truncated_tokens) == (8, 0, 0)
    assert stats.trainable == 2 * 4 + 8 * 40


def test_truncating_more_than_the_threshold_fails_and_names_the_rows() -> None:
    rows = [(10, 4)] * 90 + [(20, 20)] * 10  # 10% over maxLength=16
    with pytest.raises(InvalidDataset) as err:
        data.check_tokens(_tokenized([*rows[85:], *rows[:85]]), max_length=16, packing="bfd")  # default 5%
    assert str(err.value) == (
        "10 of 100 samples (10.0%) are longer than training.maxLength=16 tokens and would be truncated by packing "
        "bfd, cutting 40 of 1100 tokens (40 of them trained; longest sample 20 tokens); training split rows 5, 6, 7, "
        "8, 9 (and 5 more). That is more than training.maxTruncatedFraction=0.05: raise training.maxLength, shorten "
        "the samples, or use training.packing bfd_split (splits long samples into maxLength pieces, keeping every "
        "token); or raise training.maxTruncatedFraction to accept the loss")
    assert data.check_tokens(_tokenized(rows), 16, "bfd", max_truncated_fraction=0.1).truncated_samples == 10
    with pytest.raises(InvalidDataset, match="1 of 100 samples"):
        data.check_tokens(_tokenized([(10, 4)] * 99 + [(17, 17)]), 16, "none", max_truncated_fraction=0)
    everything = _tokenized([(20, 20)] * 3)
    assert data.check_tokens(everything, 16, "bfd", max_truncated_fraction=1).truncated_samples == 3  # 1 accepts all


def test_wrapped_packing_accepts_long_samples(tmp_path: Path, dataset_spec: Any, store: Any,
                                             tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "long.jsonl", [{"text": "word " * 50}] * 3)
    ds = load(dataset_spec(source="jsonl", uri=str(path)), store, tmp_path).train
    tokenized = data.tokenize(ds, tokenizer)
    stats = data.check_tokens(tokenized, max_length=16, packing="wrapped")
    assert stats.too_long == 3 and stats.trainable == stats.tokens
    with pytest.raises(InvalidDataset, match="all 3 samples are longer than training.maxLength=16"):
        data.check_tokens(tokenized, max_length=16, packing="bfd")


def test_template_fields_parsing() -> None:
    assert data.template_fields("{a} and {b.c} and {d[0]} {a}") == ["a", "b", "d"]
    with pytest.raises(InvalidDataset, match="positional"):
        data.template_fields("{} {0}")
    with pytest.raises(InvalidDataset, match="not a valid format string"):
        data.template_fields("{unclosed")


SAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"


@pytest.mark.parametrize("name,fields", [
    ("kubetune-qa.jsonl", {"format": "template", "template": TEMPLATE}),
    ("kubetune-chat.jsonl", {"format": "messages"}),
    ("kubetune-prompt-completion.jsonl", {"format": "promptCompletion"}),
])
def test_shipped_sample_datasets_are_valid(name: str, fields: dict[str, Any], tmp_path: Path, dataset_spec: Any,
                                           store: Any, tokenizer: Any) -> None:
    spec = dataset_spec(source="jsonl", uri=str(SAMPLES / name), **fields)
    splits = load(spec, store, tmp_path)
    assert len(splits.train) == 16
    stats = data.check_tokens(data.tokenize(splits.train, tokenizer), 128, "bfd")
    assert stats.too_long == 0 and stats.trainable > 0


# -- large data: Arrow, memory-mapped ------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["text", "template", "messages"])
def test_splits_are_arrow_files_under_the_work_dir(fmt: str, tmp_path: Path, dataset_spec: Any, store: Any) -> None:
    """No split is held as Python rows: the data and TRL's columns are Arrow files under the pod's
    work dir, memory-mapped (datasets' JSON loader for plain columns, whole JSON lines otherwise)."""
    rows = [{"text": f"doc {i}", "question": q, "answer": a, "messages": MESSAGES[i]}
            for i, (q, a) in enumerate(QA[:12])]
    spec = dataset_spec(source="jsonl", uri=str(write_jsonl(tmp_path / "d.jsonl", rows)), format=fmt,
                        template=TEMPLATE if fmt == "template" else None, eval={"fraction": 0.25})
    splits = load(spec, store, tmp_path)
    for ds in (splits.train, splits.eval):
        assert ds.cache_files and all(Path(f["filename"]).is_relative_to(tmp_path / "work" / "hf-cache")
                                      for f in ds.cache_files)
    assert len(splits.train) + len(splits.eval) == 12
    column = "messages" if fmt == "messages" else "text"
    assert sorted([*splits.train[column], *splits.eval[column]]) == sorted(
        {"text": [r["text"] for r in rows], "template": [TEMPLATE.format(**r) for r in rows],
         "messages": [json.dumps(r["messages"]) for r in rows]}[fmt])


def test_a_bad_json_line_is_named_in_a_large_file(tmp_path: Path, dataset_spec: Any, store: Any) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": f"doc {i}"} for i in range(2500)])
    lines = path.read_text().splitlines()
    lines[2345] = '{"text": "cut'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidDataset) as err:
        load(dataset_spec(source="jsonl", uri=str(path)), store, tmp_path)
    assert str(err.value) == "train.jsonl line 2346 is not valid JSON: Invalid control character at (column 14)"


def test_missing_and_null_values_are_told_apart_in_loaded_jsonl(tmp_path: Path, dataset_spec: Any,
                                                                store: Any) -> None:
    """datasets' JSON loader reads an absent key as null; the message still says which it is."""
    rows = [{"question": f"q {i}", "answer": f"a {i}"} for i in range(1500)]  # more than one batch
    rows[3] = {"question": "q"}
    rows[1200] = {"question": "q", "answer": None}
    spec = dataset_spec(source="jsonl", uri=str(write_jsonl(tmp_path / "qa.jsonl", rows)), format="template",
                        template=TEMPLATE)
    with pytest.raises(InvalidDataset) as err:
        load(spec, store, tmp_path)
    assert str(err.value) == ("dataset.template fields must have values: row 3: 'answer' is missing; "
                              "row 1200: 'answer' is null")


def test_numbers_keep_their_json_type(tmp_path: Path, dataset_spec: Any, store: Any) -> None:
    """A column of ints and floats (which datasets' loader would make all floats) renders as json.loads reads it."""
    rows = [{"question": "q", "answer": n} for n in (1, 2.5, 3)]
    spec = dataset_spec(source="jsonl", uri=str(write_jsonl(tmp_path / "n.jsonl", rows)), format="template",
                        template="{question} {answer}")
    assert load(spec, store, tmp_path).train["text"] == ["q 1", "q 2.5", "q 3"]
