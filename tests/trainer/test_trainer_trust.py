"""A run's result is bound to its spec (fingerprint), reproducible from its seed, evaluated at a
sane cadence, and stopped by the watchdog when it diverges or stalls — real 4-bit training with the
tiny Llama, results in the real S3 server (moto)."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from kubetune_trainer import checkpoints, fingerprint, sft
from kubetune_trainer.fingerprint import OutputConflict
from kubetune_trainer.storage import Store
from kubetune_trainer.watchdog import Diverged
from trainer_helpers import KUBETUNE, cli_env, make_pod, qa_rows, spec_doc, write_jsonl

from kubetune import api

TEMPLATE = "Question: {question}\nAnswer: {answer}"


def put_rows(s3: Any, uri: str, rows: list[dict[str, Any]]) -> str:
    bucket, key = uri.removeprefix("s3://").split("/", 1)
    s3.client().put_object(Bucket=bucket, Key=key, Body="".join(json.dumps(r) + "\n" for r in rows))
    return uri


def make_spec(model: dict[str, Any], data_uri: str, out: str, endpoint: str | None,
              evaluation: dict[str, Any] | None = None, **training: Any) -> api.FineTuneJobSpec:
    dataset = {"source": "jsonl", "uri": data_uri, "format": "template", "template": TEMPLATE}
    if evaluation:
        dataset["eval"] = evaluation
    return api.FineTuneJobSpec.model_validate(spec_doc(model, dataset, out, endpoint, **training))


def local_spec(model_dir: Path, data: Path, out: Path, evaluation: dict[str, Any] | None = None,
               **training: Any) -> api.FineTuneJobSpec:
    spec = make_spec({"name": str(model_dir)}, str(data), "s3://unused/x", None, evaluation, **training)
    return spec.model_copy(update={"output": api.S3Output.model_construct(uri=str(out))})


# -- bound to the spec ---------------------------------------------------------------------------


def test_another_job_on_a_finished_output_is_refused_before_any_work(
        tiny_model_dir: Path, s3: Any, s3_env: dict[str, str], prefix: str, tmp_path: Path) -> None:
    """The scenario of issue 17: a second job (another name, a dataset that does not exist, the same
    output.uri) used to end Succeeded in seconds with the first job's adapter."""
    model_uri = s3.upload_dir(tiny_model_dir, *f"{prefix}/base".split("/", 1))
    out = f"s3://{prefix}/run"
    data = put_rows(s3, f"s3://{prefix}/data/qa.jsonl", qa_rows(40))
    first = make_spec({"uri": model_uri}, data, out, s3.endpoint)
    result = sft.train(first, make_pod(tmp_path / "first", name="first"))
    store = Store.from_spec(first.storage)
    manifest = store.get_json(f"{out}/manifest.json")
    assert manifest["fingerprint"] == fingerprint.of(fingerprint.run_inputs(first, store))
    assert manifest["owner"] == {"namespace": "ns", "name": "first"}
    # the adapter names its real base, not the pod's download folder
    config = json.loads(store.get_text(f"{out}/adapter/adapter_config.json") or "{}")
    assert config["base_model_name_or_path"] == model_uri

    second = make_spec({"uri": model_uri}, f"s3://{prefix}/data/missing.jsonl", out, s3.endpoint)
    with pytest.raises(OutputConflict) as refused:
        sft.train(second, make_pod(tmp_path / "second", name="second"))
    message = str(refused.value)
    assert f"{out} already holds the result of FineTuneJob ns/first" in message
    assert f"dataset.uri (\"{data}\" there, \"s3://{prefix}/data/missing.jsonl\" here)" in message
    assert "set another output.uri" in message and "content" not in message  # the uri already says it
    assert not (tmp_path / "second" / "data").exists() and not (tmp_path / "second" / "model").exists()
    assert store.get_json(f"{out}/manifest.json") == manifest  # never overwritten

    # The same spec under another name is the same run: its result is reused, nothing trains.
    again = sft.train(first, make_pod(tmp_path / "third", name="third"))
    assert again == result and not (tmp_path / "third" / "trainer").exists()

    # Same spec, but the data behind the uri changed: another run.
    put_rows(s3, data, qa_rows(39))
    with pytest.raises(OutputConflict, match=r"the dataset's content \(the files at dataset.uri changed\)"):
        sft.train(first, make_pod(tmp_path / "fourth", name="fourth"))

    # As the pod runs it: exit code 8 and the reason the operator turns into Failed/OutputConflict.
    spec_file = tmp_path / "second.json"
    spec_file.write_text(json.dumps(second.to_wire()))
    proc = subprocess.run([KUBETUNE, "train", "--spec", str(spec_file)], capture_output=True, text=True, timeout=300,
                          env=cli_env({**s3_env, "KUBETUNE_WORK_DIR": str(tmp_path / "cli"),
                                       "KUBETUNE_TERMINATION_LOG": str(tmp_path / "termination-log")}))
    assert proc.returncode == 8, proc.stdout[-2000:] + proc.stderr[-2000:]
    termination = json.loads((tmp_path / "termination-log").read_text())
    assert termination["reason"] == "OutputConflict" and "FineTuneJob ns/first" in termination["message"]


def test_checkpoints_resume_only_their_own_run_and_skip_a_damaged_one(
        tiny_model_dir: Path, s3: Any, s3_env: dict[str, str], prefix: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    out = f"s3://{prefix}/run"
    data = put_rows(s3, f"s3://{prefix}/data/qa.jsonl", qa_rows(40))
    spec = make_spec({"name": str(tiny_model_dir)}, data, out, s3.endpoint, maxSteps=6, saveSteps=2,
                     keepCheckpoints=2, loggingSteps=1)
    sft.train(spec, make_pod(tmp_path / "a"))
    store = Store.from_spec(spec.storage)
    store.delete(f"{out}/manifest.json")  # as if the pod died after its last checkpoint
    latest = store.get_json(f"{out}/checkpoints/latest.json")
    assert latest["step"] == 6 and latest["fingerprint"] == store.get_json(
        f"{out}/checkpoints/step-6/checkpoint.json")["fingerprint"]

    # Another spec never continues these checkpoints.
    other = spec.model_copy(update={"training": spec.training.model_copy(update={"learning_rate": 1e-3})})
    with pytest.raises(OutputConflict, match=r"already holds checkpoints of FineTuneJob ns/ft .*training.learningRate"):
        sft.train(other, make_pod(tmp_path / "b"))

    # A damaged latest checkpoint: the run falls back to the previous kept one and finishes.
    bucket, key = out.removeprefix("s3://").split("/", 1)
    s3.client().put_object(Bucket=bucket, Key=f"{key}/checkpoints/step-6/adapter_model.safetensors", Body=b"garbage")
    with caplog.at_level(logging.INFO, logger="kubetune"):
        result = sft.train(spec, make_pod(tmp_path / "c"))
    assert "checkpoint s3://" in caplog.text and "step-6 is damaged" in caplog.text
    assert "resuming from step 4" in caplog.text
    assert result["progress"]["step"] == 6
    assert store.get_json(f"{out}/manifest.json") is not None

    # Stopped after the last step's checkpoint, before the manifest (SIGTERM or a kill while publishing):
    # the retry publishes that checkpoint; it never trains a step past maxSteps (HF would, from there).
    store.delete(f"{out}/manifest.json")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kubetune"):
        again = sft.train(spec, make_pod(tmp_path / "d"))
    assert "the checkpoint of step 6 is the run's last step: publishing it without training" in caplog.text
    assert (again["progress"]["step"], again["progress"]["percent"]) == (6, 100)
    assert again["progress"]["loss"] == result["progress"]["loss"]
    assert checkpoints.stored_steps(store, out)[-1] == 6
    published = store.get_json(f"{out}/manifest.json")["files"]["adapter/adapter_model.safetensors"]
    assert published == store.get_json(f"{out}/checkpoints/latest.json")["files"]["adapter_model.safetensors"]


def test_fingerprint_ignores_what_does_not_change_the_result() -> None:
    base = api.FineTuneJobSpec.model_validate(spec_doc({"name": "m"}, {"source": "jsonl", "uri": "s3://bkt/d.jsonl"},
                                                       "s3://bkt/out"))
    same = base.model_copy(update={
        "suspend": True, "resources": api.Resources(gpus=4, nodes=2), "image": "other:1", "backoff_limit": 9,
        "pod": api.PodSettings(labels={"team": "a"}),
        "training": base.training.model_copy(update={"logging_steps": 1, "save_steps": 7, "keep_checkpoints": 5,
                                                     "distributed": "fsdp"}),
    })
    assert fingerprint.spec_inputs(same) == fingerprint.spec_inputs(base)
    for changed in (base.model_copy(update={"lora": base.lora.model_copy(update={"r": 4})}),
                    base.model_copy(update={"training": base.training.model_copy(update={"seed": 1})}),
                    base.model_copy(update={"quantization": api.Quantization(bits=8)}),
                    base.model_copy(update={"model": api.ModelSource(name="m", revision="v2")})):
        assert fingerprint.spec_inputs(changed) != fingerprint.spec_inputs(base)


# -- reproducible ---------------------------------------------------------------------------------


def adapter_tensors(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def test_one_seed_gives_bit_equal_adapters(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch
    from peft import AutoPeftModelForCausalLM

    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(40))
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        spec = local_spec(tiny_model_dir, data, tmp_path / name, maxSteps=3, seed=seed)
        spec = spec.model_copy(update={"lora": spec.lora.model_copy(update={"dropout": 0.1})})
        sft.train(spec, make_pod(tmp_path / f"work-{name}"))
        runs[name] = adapter_tensors(tmp_path / name)
    assert runs["a"].keys() == runs["b"].keys()
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])  # LoRA init, dropout, data order
    assert any(not torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])  # the seed does matter
    # The adapter loads anywhere its base is: AutoPeft finds the base by the name it records.
    model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "a" / "adapter"))
    assert model.peft_config["default"].base_model_name_or_path == str(tiny_model_dir)


# -- evaluation -----------------------------------------------------------------------------------


def test_evaluation_cadence_cap_and_final_evaluation(tiny_model_dir: Path, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(40))
    spec = local_spec(tiny_model_dir, data, tmp_path / "default", evaluation={"fraction": 0.5, "maxSamples": 3},
                      maxSteps=10, loggingSteps=1)
    with caplog.at_level(logging.INFO, logger="kubetune"):
        result = sft.train(spec, make_pod(tmp_path / "w1"))
    assert "evaluating on 3 of 20 evaluation rows" in caplog.text
    manifest = json.loads((tmp_path / "default" / "manifest.json").read_text())
    state = json.loads((tmp_path / "w1" / "trainer" / "checkpoint-10" / "trainer_state.json").read_text())
    evals = [h["step"] for h in state["log_history"] if "eval_loss" in h]
    assert evals == [2, 4, 6, 8, 10]  # 5 evaluations a run by default, not one per logging step
    assert manifest["metrics"]["finalEvalPerplexity"] == pytest.approx(math.exp(manifest["metrics"]["finalEvalLoss"]))
    assert result["progress"]["evalLoss"] == pytest.approx(manifest["metrics"]["finalEvalLoss"], rel=1e-4)

    # An evaluation step that does not divide the run: the run still ends with an evaluation.
    spec = spec.model_copy(update={"output": api.S3Output.model_construct(uri=str(tmp_path / "every4")),
                                   "training": spec.training.model_copy(update={"eval_steps": 4})})
    sft.train(spec, make_pod(tmp_path / "w2"))
    manifest = json.loads((tmp_path / "every4" / "manifest.json").read_text())
    report = (tmp_path / "every4" / "report.md").read_text()
    assert "| 10 |" in report and "finalEvalPerplexity" in report
    rows = [line for line in report.splitlines() if line.startswith(("| 4 |", "| 8 |", "| 10 |"))]
    assert len(rows) == 3 and all(line.split("|")[3].strip() for line in rows), rows  # eval at 4, 8 and 10


def test_best_of_follows_min_delta() -> None:
    history = [{"eval_loss": 3.0, "step": 2}, {"loss": 1.0, "step": 3}, {"eval_loss": 2.5, "step": 4},
               {"eval_loss": 2.6, "step": 6}, {"eval_loss": 2.45, "step": 8}]
    assert checkpoints.best_of(history) == (8, 2.45, 0)
    assert checkpoints.best_of(history, min_delta=0.1) == (4, 2.5, 2)  # 2.45 is not 0.1 better than 2.5
    assert checkpoints.best_of([{"loss": 1.0, "step": 1}]) == (None, None, 0)


def test_early_stopping_and_keep_best(tiny_model_dir: Path, tmp_path: Path) -> None:
    """minDelta 100: no evaluation after the first improves, so patience 2 stops at the third
    evaluation; keepBest publishes the first evaluation's adapter and keeps its checkpoint, although
    keepCheckpoints is 1."""
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(40))
    spec = local_spec(tiny_model_dir, data, tmp_path / "out", maxSteps=20, evalSteps=2, saveSteps=100,
                      keepCheckpoints=1, loggingSteps=1, earlyStopping={"patience": 2, "minDelta": 100.0},
                      keepBest=True, evaluation={"fraction": 0.25})
    result = sft.train(spec, make_pod(tmp_path / "w"))
    assert result["progress"]["step"] == 6  # evaluations at 2 (best), 4, 6: two without improvement
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (manifest["metrics"]["bestStep"], manifest["metrics"]["stoppedEarly"]) == (2, True)
    assert checkpoints.stored_steps(Store(), str(tmp_path / "out")) == [2, 6]  # the best is never pruned
    import torch
    from safetensors.torch import load_file

    published = adapter_tensors(tmp_path / "out")
    best = load_file(str(tmp_path / "out" / "checkpoints" / "step-2" / "adapter_model.safetensors"))
    last = load_file(str(tmp_path / "out" / "checkpoints" / "step-6" / "adapter_model.safetensors"))
    assert all(torch.equal(published[k], best[k]) for k in published)
    assert any(not torch.equal(published[k], last[k]) for k in published)


def test_sigterm_during_evaluation_abandons_it_and_saves(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A real SIGTERM to this process on the first evaluation batch: the evaluation stops there, the
    checkpoint of that step is saved and training stops (instead of evaluating the whole set first)."""
    import datasets
    from kubetune_trainer import data, modeling
    from transformers import TrainerCallback

    source = api.ModelSource(name=str(tiny_model_dir))
    training = api.Training(maxSteps=5, maxLength=64, batchSize=1, evalSteps=1, saveSteps=100,
                            gradientCheckpointing=False)
    tokenizer = modeling.load_tokenizer(str(tiny_model_dir), source)
    model = modeling.load_model(str(tiny_model_dir), source, api.Quantization(), gradient_checkpointing=False)
    texts = datasets.Dataset.from_dict({"text": [TEMPLATE.format(**row) for row in qa_rows(40)]})
    tokenized = data.tokenize(texts, tokenizer)

    class SigtermOnFirstBatch(TrainerCallback):  # type: ignore[misc]
        batches = 0

        def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.batches += 1
            if self.batches == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    counter = SigtermOnFirstBatch()
    preemption = checkpoints.PreemptionHandler().install()
    try:
        trainer = sft.trainer_class()(
            model=model, args=sft.sft_config(training, tmp_path / "t", has_eval=True, wandb=False, run_name=None),
            train_dataset=tokenized, eval_dataset=tokenized, processing_class=tokenizer,
            peft_config=modeling.lora_config(api.Lora(r=8, dropout=0.0)), callbacks=[counter, preemption])
        trainer.train()
    finally:
        preemption.uninstall()
    assert preemption.requested and trainer.state.global_step == 1
    assert counter.batches <= 2, f"the evaluation went on for {counter.batches} of 40 batches after SIGTERM"
    assert (tmp_path / "t" / "checkpoint-1" / "adapter_model.safetensors").is_file()
    assert not any("eval_loss" in h for h in trainer.state.log_history)


# -- watchdog -------------------------------------------------------------------------------------


def poisoned_base(model_dir: Path, out: Path, rows: list[dict[str, str]], poisoned_row: dict[str, str]) -> Path:
    """The base with a NaN embedding for a token that only ``poisoned_row`` uses (a corrupted weight):
    training is fine until a batch holds that row, then the loss is NaN."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    used = {t for row in rows for t in tokenizer(TEMPLATE.format(**row))["input_ids"]}
    token = next(t for t in tokenizer(TEMPLATE.format(**poisoned_row))["input_ids"] if t not in used)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight[token] = float("nan")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_diverged_run_stops_and_keeps_the_last_good_checkpoint(
        tiny_model_dir: Path, s3: Any, s3_env: dict[str, str], prefix: str, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    out = f"s3://{prefix}/run"
    rows = qa_rows(40)
    odd = {"question": "Which instrument is a xylophone?", "answer": "A xylophone is percussion."}
    base = poisoned_base(tiny_model_dir, tmp_path / "base", rows, odd)
    data = put_rows(s3, f"s3://{prefix}/data/qa.jsonl", rows + [odd])
    spec = make_spec({"name": str(base)}, data, out, s3.endpoint, maxSteps=30, saveSteps=1, loggingSteps=1)
    with pytest.raises(Diverged) as diverged:
        sft.train(spec, make_pod(tmp_path / "w"))
    store = Store.from_spec(spec.storage)
    pointer = store.get_json(f"{out}/checkpoints/latest.json")
    message = str(diverged.value)
    found = re.match(r"diverged at step (\d+): the training loss is nan; ", message)
    assert found and pointer and f"the last good checkpoint is {pointer['uri']}" in message, message
    assert pointer["step"] == int(found.group(1)) - 1  # the diverged step's checkpoint was never stored
    store.download_dir(pointer["uri"], tmp_path / "kept")
    weights = load_file(str(tmp_path / "kept" / "adapter_model.safetensors"))
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())
    assert store.get_json(f"{out}/manifest.json") is None


def test_non_finite_adapter_weights_are_never_checkpointed() -> None:
    import torch
    from kubetune_trainer.watchdog import Watchdog
    from transformers import TrainerControl, TrainerState

    model = torch.nn.Linear(2, 2)
    guard = Watchdog(api.Watchdog(), lambda: "s3://bkt/out/checkpoints/step-4", on_stall=lambda err: None)
    state = TrainerState(global_step=5)
    guard.on_save(None, state, TrainerControl(), model=model)  # finite: nothing happens
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(Diverged, match=r"diverged by step 5: the trainable weight weight holds NaN or Inf.*"
                                       r"the last good checkpoint is s3://bkt/out/checkpoints/step-4"):
        guard.on_save(None, state, TrainerControl(), model=model)


def test_loss_rules() -> None:
    from kubetune_trainer.watchdog import loss_problem

    assert loss_problem(float("nan"), 2.0, 5) == "the training loss is nan"
    assert loss_problem(float("inf"), None, 5) == "the training loss is inf"
    assert loss_problem(10.1, 2.0, 5) is not None and loss_problem(9.9, 2.0, 5) is None
    assert loss_problem(100.0, None, 5) is None  # the first logged loss is the reference


def test_stalled_run_ends_with_its_reason_while_storage_is_frozen(
        tiny_model_dir: Path, s3_factory: Any, tmp_path: Path) -> None:
    """Freeze the S3 server (SIGSTOP) mid-run: the next checkpoint upload hangs, and the watchdog ends
    the pod with Stalled (exit 10) naming the last stored checkpoint, instead of hanging for good."""
    server = s3_factory(in_process=False)
    server.make_bucket("stall")
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(40))
    doc = make_spec({"name": str(tiny_model_dir)}, str(data), "s3://stall/run", server.endpoint, maxSteps=200,
                    saveSteps=2, loggingSteps=1, batchSize=1).to_wire()
    doc["training"]["watchdog"] = {"stallSeconds": 6}
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(doc))
    store = Store.from_spec(api.Storage(endpoint=server.endpoint), env=server.env)
    log_file = open(tmp_path / "log.txt", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([KUBETUNE, "train", "--spec", str(spec_file)], stdout=log_file, stderr=subprocess.STDOUT,
                            env=cli_env({**server.env, "KUBETUNE_WORK_DIR": str(tmp_path / "work"),
                                         "KUBETUNE_TERMINATION_LOG": str(tmp_path / "termination-log")}))
    try:
        deadline = time.monotonic() + 300
        while store.get_json("s3://stall/run/checkpoints/latest.json") is None:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log.txt").read_text()[-3000:]
            time.sleep(0.3)
        kept = store.get_json("s3://stall/run/checkpoints/latest.json")
        assert server._proc is not None
        os.kill(server._proc.pid, signal.SIGSTOP)
        frozen = time.monotonic()
        try:
            code = proc.wait(timeout=240)
        finally:
            os.kill(server._proc.pid, signal.SIGCONT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log_file.close()
    assert code == 10, (tmp_path / "log.txt").read_text()[-3000:]
    assert time.monotonic() - frozen < 120
    termination = json.loads((tmp_path / "termination-log").read_text())
    assert termination["reason"] == "Stalled"
    assert "training.watchdog.stallSeconds=6" in termination["message"]
    assert "s3://stall/run/checkpoints/step-" in termination["message"]
    assert int(termination["message"].split("checkpoints/step-")[1].split()[0].rstrip(".")) >= kept["step"]
