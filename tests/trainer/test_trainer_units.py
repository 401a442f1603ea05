"""The recipe's small pieces on their own: progress, checkpoints, preemption, report, config mapping."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from kubetune_trainer import checkpoints, local_run, modeling, report, runtime, sft
from kubetune_trainer.callbacks import ProgressReporter, format_duration, progress_fields
from kubetune_trainer.runtime import PodContext, StatusReporter, StorageError
from kubetune_trainer.storage import Store
from trainer_helpers import KUBETUNE, cli_env, marked, qa_rows, spec_doc, write_jsonl
from transformers import TrainerControl, TrainerState

from kubetune import api, contract

# -- progress ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seconds,text", [(0, "0s"), (45.4, "45s"), (750, "12m30s"), (7500, "2h05m")])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_progress_fields_rate_and_eta_count_this_process_only() -> None:
    # resumed at step 40, now at 50 of 100 after 20 s: 0.5 steps/s -> 100 s left
    p = progress_fields(step=50, total=100, epoch=1.25, elapsed=20.0, steps_done=10, tokens=4000)
    assert (p["percent"], p["etaSeconds"], p["eta"], p["tokensPerSecond"]) == (50, 100, "1m40s", 200.0)
    assert p["updatedAt"].endswith("Z") and p["epoch"] == 1.25
    assert "eta" not in progress_fields(0, 100, None, 0.0, 0, None)
    assert progress_fields(13, 12, None, 1.0, 1, None)["percent"] == 100  # the CRD's maximum: never over


class Recorder(StatusReporter):
    def __init__(self, fail: bool = False) -> None:
        super().__init__(None, None, None, None, None, None)
        self.patches: list[dict[str, Any]] = []
        self.fail = fail

    def patch(self, status: dict[str, Any]) -> bool:
        self.patches.append(status)
        return not self.fail


def test_progress_callback_reports_losses_and_prints() -> None:
    lines: list[str] = []
    recorder = Recorder()
    cb = ProgressReporter(recorder, echo=lines.append)
    state = TrainerState(max_steps=20)
    cb.on_train_begin(None, state, TrainerControl())
    state.global_step, state.epoch = 10, 0.5
    cb.on_log(None, state, TrainerControl(), logs={"loss": 2.5, "learning_rate": 1e-4, "num_tokens": 640.0})
    state.global_step = 10
    cb.on_log(None, state, TrainerControl(), logs={"eval_loss": 2.7})
    assert cb.sender.flush()  # progress goes out from a background thread, throttled: wait for the newest
    progress = recorder.patches[-1]["progress"]
    assert progress["loss"] == 2.5 and progress["evalLoss"] == 2.7 and progress["learningRate"] == 1e-4
    assert progress["step"] == 10 and progress["percent"] == 50 and progress["tokensPerSecond"] > 0
    assert lines[0].startswith("progress: step 10/20 (50%), loss 2.5")


def test_a_status_reporter_without_cluster_never_raises() -> None:
    reporter = StatusReporter("https://127.0.0.1:1", Path("/nonexistent/token"), None, "FineTuneJob", "a", "ns",
                              timeout=1)
    assert reporter.enabled and reporter.patch({"progress": {"step": 1}}) is False


def test_run_entry_reports_starting_then_done_with_the_result(tmp_path: Path) -> None:
    """``starting`` replaces a failed attempt's stage; ``done`` comes with the result, never a ``message``."""
    ok, failing = Recorder(), Recorder()
    ctx = PodContext(kind="FineTuneJob", name="ft", namespace="ns", work_dir=tmp_path, reporter=ok,
                     termination_log=tmp_path / "termination-log")
    result = {"adapterUri": "s3://b/run/adapter"}
    assert runtime.run_entry("train", lambda _: result, ctx) == contract.EXIT_OK
    assert ok.patches == [{"stage": "starting"}, {"adapterUri": "s3://b/run/adapter", "stage": "done"}]
    assert json.loads(ctx.termination_log.read_text())["result"] == result

    def down(pod: PodContext) -> dict[str, Any]:
        pod.reporter.patch({"stage": "loading dataset s3://b/data.jsonl"})
        raise StorageError("s3 down")

    ctx.reporter = failing
    assert runtime.run_entry("train", down, ctx) == contract.EXIT_STORAGE
    assert failing.patches == [{"stage": "starting"}, {"stage": "loading dataset s3://b/data.jsonl"}]


def test_long_stages_are_cut_to_the_crd_limit() -> None:
    long = "loading dataset s3://bucket/" + "x" * 1000
    cut = runtime.bounded({"stage": long, "progress": {"step": 1}})
    assert len(cut["stage"]) == api.STAGE_MAX_LENGTH and cut["stage"].startswith("loading dataset s3://bucket/xx")
    assert cut["stage"].endswith("...") and cut["progress"] == {"step": 1}
    assert runtime.bounded({"stage": "training from step 0"}) == {"stage": "training from step 0"}
    assert runtime.bounded({"progress": {"step": 2}}) == {"progress": {"step": 2}}


# -- checkpoints ------------------------------------------------------------------------------


def _fake_checkpoint(path: Path, step: int) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(os.urandom(64))
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_upload_prune_and_download_latest(tmp_path: Path) -> None:
    store, out = Store(), str(tmp_path / "out")
    for step in (2, 4, 6):
        checkpoints.upload_checkpoint(store, _fake_checkpoint(tmp_path / f"c{step}", step), out, step)
        checkpoints.prune(store, out, keep=2, current=step)
    assert checkpoints.stored_steps(store, out) == [4, 6]
    # a folder whose upload never finished (no pointer moved to it) is ignored
    _fake_checkpoint(Path(out) / "checkpoints" / "step-8", 8)
    local, step = checkpoints.download_latest(store, out, tmp_path / "work")
    assert step == 6 and json.loads((local / "trainer_state.json").read_text()) == {"global_step": 6}
    # a checkpoint that no longer matches its pointer is never resumed from: the previous kept one is
    (Path(out) / "checkpoints" / "step-6" / "adapter_model.safetensors").write_bytes(b"corrupt")
    local, step = checkpoints.download_latest(store, out, tmp_path / "work")
    assert step == 4 and json.loads((local / "trainer_state.json").read_text()) == {"global_step": 4}
    # ... and when none is intact, the run starts over (a correct result, later)
    (Path(out) / "checkpoints" / "step-4" / "trainer_state.json").write_text("{}")
    assert checkpoints.download_latest(store, out, tmp_path / "work") is None
    assert checkpoints.download_latest(store, str(tmp_path / "empty"), tmp_path / "work") is None


def test_sigterm_sets_save_and_stop_on_the_next_step() -> None:
    handler = checkpoints.PreemptionHandler().install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # does not kill: the handler only raises a flag
        assert handler.requested
        state, control = TrainerState(), TrainerControl()
        state.global_step = 7
        handler.on_step_end(None, state, control)
        assert control.should_save and control.should_training_stop
    finally:
        handler.uninstall()
    assert signal.getsignal(signal.SIGTERM) is not handler._on_signal


# -- report -----------------------------------------------------------------------------------

HISTORY = [{"loss": 3.0, "step": 1}, {"loss": 2.0, "step": 5}, {"eval_loss": 2.4, "step": 5},
           {"train_loss": 2.5, "train_runtime": 9.0, "step": 5}]


def test_report_files(tmp_path: Path) -> None:
    png = report.plot_loss(HISTORY, tmp_path / "loss.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    metrics = report.metrics_from(HISTORY, {"train_loss": 2.5, "train_runtime": 9.0})
    # trainLoss from the history, weighted by the steps each logged loss covers: (3.0 x 1 + 2.0 x 4) / 5
    assert metrics == {"firstLoss": 3.0, "finalLoss": 2.0, "finalEvalLoss": 2.4, "trainLoss": pytest.approx(2.2),
                       "finalEvalPerplexity": pytest.approx(math.exp(2.4)), "trainRuntimeSeconds": 9.0}
    # after a resume, train()'s own figures cover one pod only: its runtime and throughput are left out
    resumed = report.metrics_from(HISTORY, {"train_loss": 9.9, "train_runtime": 1.0, "train_samples_per_second": 7},
                                  resumed=True)
    assert resumed["trainLoss"] == pytest.approx(2.2)
    assert "trainRuntimeSeconds" not in resumed and "samplesPerSecond" not in resumed
    spec = api.FineTuneJobSpec.model_validate(spec_doc({"name": "m"}, {"source": "jsonl", "uri": "d.jsonl"},
                                                       "s3://bkt/o"))
    text = report.render_report("job", spec, {"adapterUri": "s3://bkt/o/adapter", "progress": {"step": 5}},
                                metrics, HISTORY, {"torch": "2"}, {"trainingRows": 3})
    assert "| 5 | 2.0000 | 2.4000 |" in text and "`s3://bkt/o/adapter`" in text and "- trainingRows: 3" in text


# -- config mapping ---------------------------------------------------------------------------


def test_sft_config_on_cpu(tmp_path: Path) -> None:
    t = api.Training(maxSteps=10, packing="wrapped", evalSteps=None, loggingSteps=3)
    config = sft.sft_config(t, tmp_path, has_eval=True, wandb=False, run_name="x")
    assert (config.bf16, config.fp16, config.optim, config.max_steps) == (False, False, "adamw_torch", 10)
    # evaluation: 5 times a run by default (a fraction of the steps), not every logging step
    assert (config.packing, config.packing_strategy, config.eval_steps) == (True, "wrapped", 0.2)
    assert config.logging_nan_inf_filter is False  # a NaN step must show in the logged loss (the watchdog)
    every7 = sft.sft_config(api.Training(maxSteps=10, evalSteps=7), tmp_path, has_eval=True, wandb=False, run_name=None)
    assert every7.eval_steps == 7
    assert config.report_to == [] or config.report_to == "none" or config.report_to == ["none"]
    assert config.dataset_num_proc is None and config.assistant_only_loss is False  # data.tokenize did that work
    none = sft.sft_config(api.Training(epochs=2, packing="none"), tmp_path, False, True, None)
    assert (none.packing, none.num_train_epochs, none.eval_strategy, none.report_to) == (False, 2, "no", ["wandb"])
    assert sft.optimizer_name("paged_adamw_8bit") == "paged_adamw_8bit"


@pytest.mark.parametrize("cuda,capability,expected", [
    (False, None, (False, False)),     # CPU: float32
    (True, (7, 5), (False, True)),     # T4: bf16 only emulated -> fp16 with a loss scaler
    (True, (7, 0), (False, True)),     # V100
    (True, (8, 0), (True, False)),     # A100
    (True, (9, 0), (True, False)),     # H100
])
def test_mixed_precision_follows_native_bf16(cuda: bool, capability: Any, expected: tuple[bool, bool]) -> None:
    assert modeling.mixed_precision(True, cuda, capability) == expected
    assert modeling.mixed_precision(False, cuda, capability) == (False, False)  # training.bf16: false


def test_quantization_and_lora_configs() -> None:
    import torch

    nf4 = modeling.quantization_config(api.Quantization())
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4" and nf4.bnb_4bit_use_double_quant
    assert nf4.bnb_4bit_compute_dtype == torch.float32  # no GPU here: bf16 would be emulated
    assert modeling.quantization_config(api.Quantization(bits=8)).load_in_8bit
    assert modeling.quantization_config(api.Quantization(bits=16)) is None
    assert modeling.lora_config(api.Lora()).target_modules == "all-linear"
    custom = modeling.lora_config(api.Lora(targetModules=["q_proj", "v_proj"], useRslora=True))
    assert set(custom.target_modules) == {"q_proj", "v_proj"} and custom.use_rslora


def test_chat_template_without_generation_markers_falls_back(tokenizer: Any) -> None:
    messages = api.Dataset(source="jsonl", uri="x", format="messages")
    assert sft.assistant_only_loss(messages, tokenizer) == (False, tokenizer.chat_template)
    assert sft.assistant_only_loss(api.Dataset(source="jsonl", uri="x"), tokenizer) == (False, None)


def test_chat_template_with_generation_markers_trains_assistant_turns_only(tokenizer: Any) -> None:
    marked_tokenizer = marked(tokenizer)
    messages = api.Dataset(source="jsonl", uri="x", format="messages")
    assert sft.assistant_only_loss(messages, marked_tokenizer) == (True, None)
    out = marked_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
        tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert 0 < sum(out["assistant_masks"]) < len(out["input_ids"])


def test_tokenizer_first_download_from_s3(tiny_model_dir: Path, s3: Any, bucket: str, prefix: str,
                                          store: Any, tmp_path: Path) -> None:
    uri = s3.upload_dir(tiny_model_dir, *f"{prefix}/model".split("/", 1))
    source = api.ModelSource(uri=uri)
    path = modeling.resolve_model(source, store, tmp_path, tokenizer_only=True)
    assert not list(Path(path).glob("*.safetensors"))
    assert modeling.load_tokenizer(path, source).pad_token is not None
    modeling.resolve_model(source, store, tmp_path)
    assert list(Path(path).glob("*.safetensors"))


def test_apply_overrides() -> None:
    spec = api.FineTuneJobSpec.model_validate(spec_doc({"name": "m"}, {"source": "jsonl", "uri": "d"}, "s3://bkt/o"))
    local = local_run.apply_overrides(spec, "rel/out", 3)
    assert local.output.uri == str(Path("rel/out").resolve())
    assert (local.training.max_steps, local.training.epochs) == (3, None)
    assert local_run.apply_overrides(spec, "s3://other/x", None).output.uri == "s3://other/x"


# -- kubetune run -----------------------------------------------------------------------------


def test_kubetune_run_locally_prints_progress(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(12))
    doc = spec_doc({"name": str(tiny_model_dir)}, {"source": "jsonl", "uri": str(data), "format": "template",
                                                   "template": "{question} {answer}"}, "s3://not-used/out",
                   maxSteps=50, loggingSteps=1)
    manifest = tmp_path / "job.yaml"
    manifest.write_text(json.dumps({"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob",
                                    "metadata": {"name": "local"}, "spec": doc}))
    proc = subprocess.run([KUBETUNE, "run", str(manifest), "--output", str(tmp_path / "out"), "--max-steps", "2"],
                          cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "progress: step 1/2 (50%)" in proc.stdout and "progress: step 2/2 (100%)" in proc.stdout
    assert (tmp_path / ".kubetune-work" / "local").is_dir()
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["result"]["progress"]["step"] == 2


def test_bfd_without_a_varlen_kernel_trains_one_packed_row_per_micro_batch() -> None:
    from kubetune_trainer import sft

    t = api.Training(maxSteps=5, batchSize=4, gradientAccumulationSteps=2)
    assert sft.micro_batching(t, varlen_attention=False) == (1, 8)  # same tokens per optimizer step
    assert sft.micro_batching(t, varlen_attention=True) == (4, 2)  # flash varlen: rows stay separate
    wrapped = api.Training(maxSteps=5, batchSize=4, gradientAccumulationSteps=2, packing="wrapped")
    assert sft.micro_batching(wrapped, varlen_attention=False) == (4, 2)
