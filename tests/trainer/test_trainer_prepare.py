"""Prepared data (issue #18, item 3): the data is checked and tokenized once, stored content-addressed
next to the output, and a retry, a resume or a later job with the same data and tokenizer trains from
the stored files without tokenizing (here: ``data.load_splits`` and ``data.tokenize`` raise if
called). Against the real S3 server, with the tiny model and real 4-bit training."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from kubetune_trainer import data, prepare, sft
from kubetune_trainer.runtime import InvalidDataset
from kubetune_trainer.storage import Store
from trainer_helpers import KUBETUNE, cli_env, make_pod, qa_rows, spec_doc, write_jsonl

from kubetune import api

pytestmark = pytest.mark.integration

TEMPLATE = {"format": "template", "template": "Question: {question}\nAnswer: {answer}"}


def put_jsonl(s3: Any, prefix: str, name: str, rows: list[dict[str, Any]]) -> str:
    bucket, _, key = f"{prefix}/{name}".partition("/")
    s3.client().put_object(Bucket=bucket, Key=key, Body="".join(json.dumps(r) + "\n" for r in rows))
    return f"s3://{prefix}/{name}"


def job(tiny: Path, s3: Any, data_uri: str, out: str, **training: Any) -> api.FineTuneJobSpec:
    doc = spec_doc({"name": str(tiny)}, {"source": "jsonl", "uri": data_uri, **TEMPLATE, "eval": {"fraction": 0.1}},
                   out, s3.endpoint, **training)
    return api.FineTuneJobSpec.model_validate(doc)


def prepared_keys(store: Store, prefix: str) -> set[str]:
    return {rel.split("/")[0] for rel in store.list(f"s3://{prefix}/{prepare.PREPARED_DIR}")}


def no_tokenizing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("the data was loaded or tokenized again")

    monkeypatch.setattr(data, "load_splits", refuse)
    monkeypatch.setattr(data, "tokenize", refuse)


def prepare_cli(tmp_path: Path, spec: api.FineTuneJobSpec, env: dict[str, str]) -> tuple[int, dict[str, Any], str]:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec.to_wire()))
    proc = subprocess.run([KUBETUNE, "prepare", "--spec", str(path)], capture_output=True, text=True, timeout=300,
                          env=cli_env({**env, "KUBETUNE_WORK_DIR": str(tmp_path / "prep-work"),
                                       "KUBETUNE_TERMINATION_LOG": str(tmp_path / "termination-log")}))
    return proc.returncode, json.loads((tmp_path / "termination-log").read_text()), proc.stderr


def test_prepare_stage_then_a_later_job_trains_without_tokenizing(
        tiny_model_dir: Path, s3: Any, s3_env: dict[str, str], prefix: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    data_uri = put_jsonl(s3, prefix, "qa.jsonl", qa_rows(40))
    first = job(tiny_model_dir, s3, data_uri, f"s3://{prefix}/runs/a")
    code, message, stderr = prepare_cli(tmp_path, first, s3_env)
    assert code == 0, stderr[-3000:]
    report = message["result"]["data"]
    store = Store.from_spec(first.storage)
    (key,) = prepared_keys(store, f"{prefix}/runs")
    assert report["preparedUri"] == f"s3://{prefix}/runs/{prepare.PREPARED_DIR}/{key}"
    assert (report["trainingRows"], report["evalRows"]) == (36, 4) and report["tokens"] > 0
    stored = store.get_json(f"{report['preparedUri']}/report.json")
    assert sum(stored["lengthHistogram"].values()) == 36 and stored["keyInputs"]["datasetContent"]
    assert set(store.get_json(f"{report['preparedUri']}/manifest.json")["files"]) == {
        "train.parquet", "eval.parquet", "report.json"}
    assert not store.list(f"s3://{prefix}/runs/a"), "preparing writes nothing into output.uri"

    # a later job, another output in the same folder, other operational settings: reuses, trains
    no_tokenizing(monkeypatch)
    later = job(tiny_model_dir, s3, data_uri, f"s3://{prefix}/runs/b", maxSteps=3, loggingSteps=1)
    result = sft.train(later, make_pod(tmp_path / "work-b", name="b"))
    manifest = store.get_json(f"s3://{prefix}/runs/b/manifest.json")
    assert manifest["data"]["preparedUri"] == report["preparedUri"]
    assert manifest["data"]["trainingRows"] == 36 and result["progress"]["step"] == 3
    assert prepared_keys(store, f"{prefix}/runs") == {key}


def test_changed_data_or_damaged_files_are_prepared_again(
        tiny_model_dir: Path, s3: Any, s3_env: dict[str, str], prefix: str, tmp_path: Path, store: Store) -> None:
    data_uri = put_jsonl(s3, prefix, "qa.jsonl", qa_rows(20))
    spec = job(tiny_model_dir, s3, data_uri, f"s3://{prefix}/out")
    ctx = make_pod(tmp_path / "w1")
    first = prepare.run(spec, ctx)["data"]
    assert first["trainingRows"] == 18

    # the same content again: reused, even from a fresh work dir
    again = prepare.prepare(spec, make_pod(tmp_path / "w2"), store, *_tokenizing(spec, store, tmp_path))
    assert again.reused and again.uri == first["preparedUri"] and len(again.train) == 18

    # a damaged stored file is detected by its sha256 and the data prepared again (same key)
    bucket, _, key = first["preparedUri"].removeprefix("s3://").partition("/")
    s3.client().put_object(Bucket=bucket, Key=f"{key}/train.parquet", Body=b"not parquet")
    repaired = prepare.prepare(spec, make_pod(tmp_path / "w3"), store, *_tokenizing(spec, store, tmp_path))
    assert not repaired.reused and repaired.uri == first["preparedUri"] and len(repaired.train) == 18

    # changed content at the same uri: another key
    put_jsonl(s3, prefix, "qa.jsonl", qa_rows(30))
    changed = prepare.run(spec, make_pod(tmp_path / "w4"))["data"]
    assert changed["preparedUri"] != first["preparedUri"] and changed["trainingRows"] == 27
    assert len(prepared_keys(store, prefix)) == 2


def _tokenizing(spec: api.FineTuneJobSpec, store: Store, tmp_path: Path) -> tuple[Any, ...]:
    from kubetune_trainer import fingerprint, modeling
    from kubetune_trainer.distributed import Ranks

    tokenizer = modeling.load_tokenizer(prepare.tokenizer_for(spec, store, tmp_path / "tok", Ranks()), spec.model)
    assistant_only, chat_template = sft.assistant_only_loss(spec.dataset, tokenizer)
    return tokenizer, assistant_only, chat_template, fingerprint.run_inputs(spec, store)


def test_token_checks_run_with_each_jobs_settings_on_reused_data(
        tiny_model_dir: Path, s3: Any, s3_env: dict[str, str], prefix: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    data_uri = put_jsonl(s3, prefix, "qa.jsonl", qa_rows(20))
    prepare.run(job(tiny_model_dir, s3, data_uri, f"s3://{prefix}/a", maxLength=64), make_pod(tmp_path / "a"))
    no_tokenizing(monkeypatch)
    short = job(tiny_model_dir, s3, data_uri, f"s3://{prefix}/b", maxLength=8, packing="bfd")
    with pytest.raises(InvalidDataset, match="longer than training.maxLength=8"):
        prepare.run(short, make_pod(tmp_path / "b"))


def test_bad_rows_fail_the_prepare_stage_and_store_nothing(
        tiny_model_dir: Path, s3: Any, s3_env: dict[str, str], prefix: str, tmp_path: Path, store: Store) -> None:
    rows = qa_rows(10)
    rows[6] = {"question": "no answer here"}
    spec = job(tiny_model_dir, s3, put_jsonl(s3, prefix, "bad.jsonl", rows), f"s3://{prefix}/out")
    code, message, stderr = prepare_cli(tmp_path, spec, s3_env)
    assert code == 3, stderr[-3000:]
    assert message["reason"] == "InvalidDataset" and "row 6" in message["message"], message
    assert not prepared_keys(store, prefix)


def test_prepared_data_next_to_the_output() -> None:
    assert prepare.root("s3://models/runs/a") == "s3://models/runs/.kubetune/prepared"
    assert prepare.root("s3://models/a/") == "s3://models/.kubetune/prepared"
    assert prepare.root("/tmp/out/run-1") == "/tmp/out/.kubetune/prepared"


def test_a_run_that_cannot_fit_stops_in_prepare(
        tiny_model_dir: Path, s3: Any, s3_env: dict[str, str], prefix: str, tmp_path: Path, store: Store) -> None:
    """Will it fit? (issue #18, item 5) 65536-token packed rows need a dense sdpa mask of 8 GiB; the
    job's GPUs have 4 GiB (resources.gpuMemory): `kubetune prepare` exits 11 (permanent) after the
    data checks, from the model's config alone (no weights move), and says what would fit."""
    spec = job(tiny_model_dir, s3, put_jsonl(s3, prefix, "qa.jsonl", qa_rows(10)), f"s3://{prefix}/out",
               maxLength=65536)
    spec = spec.model_copy(update={"resources": api.Resources(gpus=1, gpu_memory="4Gi")})
    code, message, stderr = prepare_cli(tmp_path, spec, s3_env)
    assert code == 11, stderr[-3000:]
    assert message["reason"] == "InsufficientGPUMemory", message
    assert "each GPU has 4.0 GiB (resources.gpuMemory); this would fit: training.maxLength 32768" in \
        message["message"], message


def test_auto_bits_trains_in_16_bit_when_it_fits(tiny_model_dir: Path, tmp_path: Path) -> None:
    """quantization.bits auto on a CPU pod with 8Gi (resources.memory): the tiny model fits with
    room, so the base loads unquantized (16-bit LoRA: float32 on CPU); status.memory and the
    published spec say 16."""
    data_file = write_jsonl(tmp_path / "qa.jsonl", qa_rows(12))
    doc = spec_doc({"name": str(tiny_model_dir)}, {"source": "jsonl", "uri": str(data_file), **TEMPLATE},
                   "s3://unused/x", maxSteps=2)
    doc.update(quantization={"bits": "auto"}, resources={"gpus": 0, "memory": "8Gi"}, prepare={"mode": "inline"})
    spec = api.FineTuneJobSpec.model_validate(doc)
    spec = spec.model_copy(update={"output": api.S3Output.model_construct(uri=str(tmp_path / "out"))})
    ctx = make_pod(tmp_path / "work")
    patches: list[dict[str, Any]] = []
    ctx.reporter.patch = lambda p: patches.append(p) or True  # type: ignore[method-assign]
    sft.train(spec, ctx)
    (plan,) = [p["memory"] for p in patches if "memory" in p]
    assert plan["bits"] == 16 and plan["fits"] is True and plan["gpuMemorySource"] == "resources.memory (no GPUs)"
    published = json.loads((tmp_path / "out" / "spec.json").read_text())
    assert published["quantization"]["bits"] == 16
