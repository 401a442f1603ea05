"""Trainer throughput benchmark: the classic TRL QLoRA recipe vs kubetune's trainer, same machine, model and data.

    .venv/bin/python bench/trainer.py --write docs/benchmarks.md            # CPU: tiny model + SmolLM2-135M
    python3 bench/trainer.py --gpu --json-out $OUT/trainer-gpu.json         # GPU: Llama-3.2-1B / Llama-3-8B shapes
    .venv/bin/python bench/trainer.py --from-json trainer-gpu.json --write docs/benchmarks.md   # fold GPU results in

Recipes compared (every configuration runs in its own Python process, so its peak memory is its own):

* ``baseline`` — the classic recipe: TRL ``SFTTrainer`` with ``wrapped`` packing (the old
  ConstantLengthDataset: samples attend to each other across boundaries), the default attention,
  QLoRA NF4 + double quant, LoRA r 16 on q_proj/v_proj, gradient checkpointing, paged AdamW 32-bit.
* ``kubetune`` — :func:`kubetune_trainer.sft.train` with the spec's defaults (``bfd`` packing without
  cross-sample attention, LoRA r 16 on all linear layers), writing to a local folder.
* ``kubetune+classic`` — kubetune's trainer with the baseline's settings (``wrapped`` packing, LoRA r 16
  on q_proj/v_proj; the other defaults already match): the trainer's own overhead, same work.
* ``kubetune+…`` — the same call with one proposed trainer change applied in-process by this script
  (``flex``: ``attn_implementation="flex_attention"``; ``liger``: Liger's RMSNorm/SwiGLU/RoPE kernels;
  ``nogc``: no gradient checkpointing; ``ga``: micro-batches of one packed row with gradient
  accumulation over batchSize rows, so bfd's flattened row never exceeds maxLength), to measure a
  change before it lands in sft.py.

Reported: tokens/s (real tokens: no padding exists in either packing), step time, peak memory
(GPU: ``torch.cuda.max_memory_allocated``; CPU: the process's peak RSS), MFU on GPU, loss after K
steps, and the ratios against the baseline of the same model and sequence length. MFU counts
4·N FLOPs per token (forward 2N + input-gradient backward 2N; the frozen base gets no weight
gradients; recomputation and attention are not counted), N = parameters in matrix products
(all but the input embedding, plus the LM head), over the GPU's dense bf16 peak.

Errors: a configuration that fails or runs out of time is recorded with its error, the others go on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# The repo's packages and helpers, also where kubetune is not pip-installed (the GPU machine).
for _path in (REPO / "bench", REPO / "hack", REPO / "trainer", REPO):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import common  # noqa: E402

TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n{response}"
WORDS = (
    "the model data train token layer cluster node job storage bucket adapter merge quantize batch step loss "
    "gradient optimizer schedule warmup memory kernel attention sequence packing sample length tail median "
    "operator resource status condition retry checkpoint upload download verify publish tokenizer template "
    "question answer explain describe compare summarize why how what when where which because therefore "
    "however moreover finally first second third example result value error message request response time "
    "speed throughput latency budget cost price order customer product service support policy contract "
    "report table figure chart metric measure estimate forecast risk plan goal team project release version "
    "update change fix bug test build deploy monitor alert incident review design document note summary"
).split()
# Dense bf16 peak of the GPU (no sparsity), for MFU.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}

MODEL_SHAPES: dict[str, dict[str, Any]] = {
    # Llama-3.2-1B and Llama-3-8B shapes (random weights: throughput does not depend on the values).
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
}

CPU_PLAN = [  # (model, seq, batch, steps, warmup, variants)
    ("tiny", 256, 2, 30, 3, ["baseline", "kubetune+classic", "kubetune"]),
    ("smollm2", 128, 2, 16, 2, ["baseline", "kubetune+classic", "kubetune"]),
]
GPU_PLAN = [  # most important first: a time budget may cut the tail
    ("llama-8b", 4096, 4, 9, 3, ["baseline", "kubetune+liger+ga", "kubetune+ga", "kubetune", "kubetune+flex+liger"]),
    ("llama-1b", 4096, 4, 11, 3, ["baseline", "kubetune+liger+ga", "kubetune+ga", "kubetune", "kubetune+flex",
                                  "kubetune+flex+liger", "kubetune+flex+liger+nogc"]),
    ("llama-1b", 2048, 4, 11, 3, ["baseline", "kubetune+liger+ga", "kubetune"]),
]


# ----------------------------------------------------------------------------------------------
# Data: a long-tailed mix of sample lengths, template-formatted
# ----------------------------------------------------------------------------------------------


def sample_lengths(n: int, median: float, sigma: float, lo: int, hi: int, seed: int) -> list[int]:
    """n lengths (in words) from a log-normal with this median, clipped to [lo, hi]."""
    rng = random.Random(seed)
    return [max(lo, min(hi, int(rng.lognormvariate(math.log(median), sigma)))) for _ in range(n)]


def make_rows(total_words: int, median: float, sigma: float, max_words: int, seed: int) -> list[dict[str, str]]:
    """instruction/response rows until ``total_words`` words exist; responses 3x longer than prompts."""
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    words = 0
    batch_seed = seed
    while words < total_words:
        batch_seed += 1
        for length in sample_lengths(256, median, sigma, 8, max_words, batch_seed):
            n_prompt = max(3, length // 4)
            prompt = " ".join(rng.choices(WORDS, k=n_prompt)).capitalize() + "?"
            response = " ".join(rng.choices(WORDS, k=max(1, length - n_prompt))).capitalize() + "."
            rows.append({"instruction": prompt, "response": response})
            words += length
            if words >= total_words:
                break
    return rows


def write_dataset(folder: Path, seq: int, batch: int, steps: int, seed: int = 0) -> tuple[Path, dict[str, Any]]:
    """A JSONL file with enough tokens for ``steps`` full batches (about 1.35 tokens per word here).
    Median sample ~seq/8 tokens, sigma 1.0: most samples are short, ~2% are longer than seq."""
    tokens_needed = steps * batch * seq * 1.6
    median_words = seq / 8 / 1.35
    rows = make_rows(int(tokens_needed / 1.35), median_words, 1.0, int(4 * seq / 1.35), seed)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"train-{seq}.jsonl"
    with path.open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    lengths = sorted(len(r["instruction"].split()) + len(r["response"].split()) for r in rows)
    stats = {"rows": len(rows), "median_words": lengths[len(lengths) // 2],
             "p99_words": lengths[int(len(lengths) * 0.99)], "max_words": lengths[-1]}
    return path, stats


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


def save_tokenizer(dest: Path) -> Path:
    """SmolLM2's tokenizer (real BPE + chat template) into ``dest`` (carried to the GPU machine)."""
    if (dest / "tokenizer_config.json").exists():
        return dest
    import localenv
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(localenv.smollm2_dir()).save_pretrained(dest)
    return dest


def build_model(name: str, cache: Path, tokenizer_dir: Path | None) -> Path:
    """A model folder for ``name``: tiny / smollm2 (CPU) or a real-shaped Llama with random weights."""
    import localenv

    if name == "smollm2":
        return localenv.smollm2_dir()
    out = cache / name
    if (out / "config.json").exists():
        return out
    if name == "tiny":
        return localenv.tiny_model_dir(out)
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    assert tokenizer_dir is not None
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(**MODEL_SHAPES[name], max_position_embeddings=8192, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    tmp.rename(out)
    return out


def matmul_params(model_dir: Path) -> int:
    """Parameters in matrix products: all but the input embedding, plus the LM head (tied or not)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    return int(total - embed + config.vocab_size * config.hidden_size)


# ----------------------------------------------------------------------------------------------
# Worker: one configuration, in its own process
# ----------------------------------------------------------------------------------------------


class Recorder:
    """Tokens per step (from the batches), step end times, logged losses, trainable parameters."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.ends: list[float] = []
        self.losses: list[tuple[int, float]] = []
        self.trainable = 0
        self.start = 0.0
        self.profiler: Any = None
        self.pending = 0


def instrument(rec: Recorder, profile_from: int | None = None, profile_steps: int = 2) -> None:
    """Count each batch's tokens and time each optimizer step, for any Trainer built in this process.
    With ``profile_from``, steps profile_from+1.. are profiled (after the timed ones) and the top CUDA
    kernels printed."""
    import torch
    from transformers import Trainer, TrainerCallback

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    class Timing(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            if model is not None:
                rec.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            sync()
            rec.start = time.perf_counter()

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if profile_from is not None and state.global_step == profile_from:
                sync()
                rec.profiler = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
                rec.profiler.__enter__()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            sync()
            rec.ends.append(time.perf_counter())
            rec.tokens.append(rec.pending)  # every micro-batch of this optimizer step
            rec.pending = 0
            if rec.profiler is not None and state.global_step == (profile_from or 0) + profile_steps:
                rec.profiler.__exit__(None, None, None)
                device_sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
                print("PROFILE\n" + rec.profiler.key_averages().table(sort_by=device_sort, row_limit=40,
                                                                      max_name_column_width=90), flush=True)
                rec.profiler = None

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                rec.losses.append((state.global_step, float(logs["loss"])))

    original_step = Trainer.training_step
    original_init = Trainer.__init__

    def training_step(self: Any, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        mask = inputs.get("attention_mask")  # still on the CPU here: counting costs no sync
        rec.pending += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
        return original_step(self, model, inputs, *args, **kwargs)

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.add_callback(Timing())

    Trainer.training_step = training_step
    Trainer.__init__ = init


def read_rows(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_baseline(cfg: dict[str, Any], work: Path) -> None:
    """The classic QLoRA recipe (TRL docs / the QLoRA blog), wrapped packing."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(cfg["model_dir"])
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(cfg["model_dir"], quantization_config=bnb, dtype=dtype,
                                                 device_map={"": 0} if cuda else {"": "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    rows = read_rows(Path(cfg["data"]))
    dataset = Dataset.from_dict({"text": [TEMPLATE.format(**row) for row in rows]})
    args = SFTConfig(
        output_dir=str(work / "trainer"), max_steps=cfg["steps"], per_device_train_batch_size=cfg["batch"],
        learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.03, max_grad_norm=0.3,
        optim="paged_adamw_32bit" if cuda else "adamw_torch", bf16=cuda, use_cpu=not cuda,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        packing=True, packing_strategy="wrapped", max_length=cfg["seq"], dataset_text_field="text",
        logging_steps=1, save_strategy="no", report_to="none", seed=42, disable_tqdm=True,
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                      task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    trainer.train()


def apply_changes(changes: list[str]) -> None:
    """Proposed trainer changes, applied in this process around kubetune's own functions."""
    from kubetune_trainer import modeling, sft

    if "flex" in changes or "sdpa" in changes:
        impl = "flex_attention" if "flex" in changes else "sdpa"
        from transformers import AutoModelForCausalLM

        original_from_pretrained = AutoModelForCausalLM.from_pretrained

        def from_pretrained(*args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("attn_implementation", impl)
            return original_from_pretrained(*args, **kwargs)

        AutoModelForCausalLM.from_pretrained = from_pretrained  # type: ignore[method-assign]
    original_config = sft.sft_config

    def sft_config(*args: Any, **kwargs: Any) -> Any:
        config = original_config(*args, **kwargs)
        if "liger" in changes:
            config.use_liger_kernel = True
        if "nogc" in changes:
            config.gradient_checkpointing = False
        if "ga" in changes:  # same tokens per optimizer step, one packed row per micro-batch
            config.gradient_accumulation_steps *= config.per_device_train_batch_size
            config.per_device_train_batch_size = 1
        return config

    sft.sft_config = sft_config
    if "nogc" in changes:
        original_load = modeling.load_model
        modeling.load_model = lambda path, source, quant, gc: original_load(path, source, quant, False)


def run_kubetune(cfg: dict[str, Any], work: Path, changes: list[str]) -> None:
    """``kubetune_trainer.sft.train`` with the spec's defaults, output to a local folder."""
    from kubetune_trainer import local_run, sft

    from kubetune import api

    apply_changes(changes)
    training = {"maxSteps": cfg["steps"], "maxLength": cfg["seq"], "batchSize": cfg["batch"], "loggingSteps": 1,
                "saveSteps": 10_000}
    lora: dict[str, Any] = {}
    if "classic" in changes:  # the baseline's settings through kubetune's trainer: what the trainer itself costs
        training["packing"] = "wrapped"
        lora = {"targetModules": ["q_proj", "v_proj"]}
    spec = api.FineTuneJobSpec.model_validate({
        "model": {"name": cfg["model_dir"]},
        "dataset": {"source": "jsonl", "uri": cfg["data"], "format": "template", "template": TEMPLATE},
        "training": training,
        **({"lora": lora} if lora else {}),
        "output": {"uri": "s3://bench/unused"},
    })
    spec = local_run.apply_overrides(spec, output=str(work / "output"), max_steps=None)
    os.environ["KUBETUNE_WORK_DIR"] = str(work / "kt-work")
    ctx = local_run.local_context("bench")
    sft.train(spec, ctx)


def worker(cfg: dict[str, Any]) -> dict[str, Any]:
    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    rec = Recorder()
    timed_steps = cfg["steps"]
    if cfg.get("profile"):  # two extra steps after the timed ones, under the profiler
        instrument(rec, profile_from=timed_steps)
        cfg = {**cfg, "steps": timed_steps + 2}
    else:
        instrument(rec)
    work = Path(tempfile.mkdtemp(prefix="kt-bench-"))
    variant: str = cfg["variant"]
    try:
        if variant == "baseline":
            run_baseline(cfg, work)
        else:
            run_kubetune(cfg, work, variant.split("+")[1:])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    warm = cfg["warmup"]
    done = min(len(rec.ends), timed_steps)
    measured = rec.tokens[warm:done]
    elapsed = rec.ends[done - 1] - rec.ends[warm - 1] if done > warm else float("nan")
    losses = [loss for step, loss in rec.losses if step <= timed_steps]
    result: dict[str, Any] = {
        "steps_done": done,
        "tokens_per_s": sum(measured) / elapsed if measured else None,
        "step_s": elapsed / len(measured) if measured else None,
        "tokens_per_step": sum(measured) / len(measured) if measured else None,
        "first_step_s": rec.ends[0] - rec.start if rec.ends else None,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "trainable_params": rec.trainable,
        "peak_rss_mib": common.peak_rss_mib(),
    }
    if torch.cuda.is_available():
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["peak_gpu_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    return result


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def gpu_peak() -> tuple[str | None, float | None]:
    import torch

    if not torch.cuda.is_available():
        return None, None
    name = torch.cuda.get_device_name(0)
    return name, next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def run_plan(plan: list[tuple[str, int, int, int, int, list[str]]], cache: Path, tokenizer_dir: Path | None,
             budget_s: float, per_config_s: float, json_out: Path | None, logs: Path | None,
             profile: bool = False, repeats: int = 1) -> dict[str, Any]:
    deadline = time.monotonic() + budget_s
    gpu_name, peak = gpu_peak()
    doc: dict[str, Any] = {"date": common.now_utc(), "machine": common.machine(), "versions": common.versions(),
                           "command": common.command_line(), "gpu_peak_flops": peak, "results": []}
    data_dir = cache / "data"
    for model_name, seq, batch, steps, warmup, variants in plan:
        t0 = time.monotonic()
        model_dir = build_model(model_name, cache, tokenizer_dir)
        build_s = time.monotonic() - t0
        n_matmul = matmul_params(model_dir)
        data, data_stats = write_dataset(data_dir, seq, batch, steps)
        print(f"== {model_name} seq {seq}: model ready in {build_s:.0f}s, N={n_matmul / 1e9:.2f}B, data {data_stats}",
              flush=True)
        for repeat, variant in [(rep, v) for rep in range(repeats) for v in variants]:  # interleaved
            left = deadline - time.monotonic()
            entry: dict[str, Any] = {"model": model_name, "seq": seq, "batch": batch, "steps": steps,
                                     "warmup": warmup, "variant": variant, "n_matmul": n_matmul, "data": data_stats,
                                     "repeat": repeat}
            if left < 60:
                entry["error"] = "skipped: out of time budget"
            else:
                cfg = {"model_dir": str(model_dir), "data": str(data), "seq": seq, "batch": batch, "steps": steps,
                       "warmup": warmup, "variant": variant, "profile": profile}
                log_path = logs / f"{model_name}-{seq}-{variant.replace('+', '_')}-{repeat}.log" if logs else None
                entry.update(common.run_worker(Path(__file__), cfg, timeout=min(per_config_s, left), log_path=log_path))
                if peak and entry.get("tokens_per_s"):
                    entry["mfu"] = 4 * n_matmul * entry["tokens_per_s"] / peak
            doc["results"].append(entry)
            print(json.dumps(entry), flush=True)
            if json_out:
                json_out.write_text(json.dumps(doc, indent=1))
    doc["gpu"] = gpu_name
    if json_out:
        json_out.write_text(json.dumps(doc, indent=1))
    return doc


def median_runs(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per configuration: with ``--repeats``, the run with the median tokens/s, annotated with
    the number of runs and their range (``runs``); failed runs count only when all failed."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["model"], r["seq"], r["batch"], r["variant"]), []).append(r)
    out = []
    for runs in groups.values():
        ok = sorted((r for r in runs if not r.get("error") and r.get("tokens_per_s")), key=lambda r: r["tokens_per_s"])
        if not ok:
            out.append(runs[0])
            continue
        mid = {**ok[(len(ok) - 1) // 2]}
        if len(ok) > 1:
            mid["runs"] = f"{len(ok)} ({ok[0]['tokens_per_s']:,.0f}–{ok[-1]['tokens_per_s']:,.0f})"
        out.append(mid)
    return out


def render(doc: dict[str, Any], heading: str) -> str:
    """One run's markdown: context, the table with ratios vs the baseline of the same run (medians when
    configurations were repeated)."""
    results = median_runs(doc["results"])
    repeated = any(r.get("runs") for r in results)
    base = {(r["model"], r["seq"]): r for r in results if r["variant"] == "baseline" and not r.get("error")}
    gpu = bool(doc.get("gpu_peak_flops"))
    mem_key, mem_name = ("peak_gpu_mib", "peak GPU mem (MiB)") if gpu else ("peak_rss_mib", "peak RSS (MiB)")
    headers = ["model", "seq × batch", "recipe", "tokens/s", "step (s)", mem_name]
    headers += ["MFU"] if gpu else []
    headers += ["loss @K", "trainable", "tokens/s ÷ base", "mem ÷ base"]
    headers += ["runs (tokens/s range)"] if repeated else []
    rows = []
    for r in results:
        b = base.get((r["model"], r["seq"]))
        if r.get("error"):
            skipped = r["error"].startswith("skipped")
            error = "not run (device time ran out)" if skipped else f"error: {r['error'][:120]}"
            rows.append([r["model"], f"{r['seq']} × {r['batch']}", r["variant"], error, None,
                         None] + ([None] if gpu else []) + [None, None, None, None] + ([None] if repeated else []))
            continue
        row = [r["model"], f"{r['seq']} × {r['batch']}", r["variant"], r.get("tokens_per_s"), r.get("step_s"),
               r.get(mem_key)]
        row += [f"{100 * r['mfu']:.1f}%" if r.get("mfu") else None] if gpu else []
        row += [r.get("loss_last"), f"{r.get('trainable_params', 0) / 1e6:.2f}M",
                common.ratio(r.get("tokens_per_s"), b and b.get("tokens_per_s")),
                common.ratio(r.get(mem_key), b and b.get(mem_key))]
        row += [r.get("runs", "1")] if repeated else []
        rows.append(row)
    m = doc["machine"]
    lines = [heading, "",
             f"- Command: `{doc['command']}`", f"- Machine: {common.describe_machine(m)}",
             f"- Versions: {common.describe_versions(doc['versions'])}", f"- Date: {doc['date']}",
             "- K steps per configuration (the first `warmup` steps are not timed); loss @K is the last logged "
             "training loss (wrapped packing lets samples attend to each other, bfd does not: losses are "
             "comparable only roughly).",
             ""]
    if gpu:
        lines.append(f"- MFU = 4·N·tokens/s ÷ {doc['gpu_peak_flops'] / 1e12:.0f} TFLOP/s (dense bf16 peak); "
                     "N = parameters in matrix products (Llama-1B shape: "
                     f"{next((r['n_matmul'] for r in results if r['model'] == 'llama-1b'), 0) / 1e9:.2f}B, "
                     f"8B shape: {next((r['n_matmul'] for r in results if r['model'] == 'llama-8b'), 0) / 1e9:.2f}B);"
                     " 4·N = forward + input-gradient backward of a frozen base, attention and recomputation "
                     "not counted.")
        lines.append("")
    lines.append(common.table(headers, rows))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--gpu", action="store_true", help="run the GPU plan (real-shaped Llama models)")
    parser.add_argument("--only", default=None, help="comma-separated models to run (e.g. llama-1b)")
    parser.add_argument("--variants", default=None, help="comma-separated recipes to keep (default: the plan's)")
    parser.add_argument("--seqs", default=None, help="comma-separated sequence lengths to keep")
    parser.add_argument("--profile", action="store_true", help="profile 2 extra steps after the timed ones")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "kubetune-bench")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder (default: SmolLM2's)")
    parser.add_argument("--budget-s", type=float, default=1800, help="stop starting configurations after this")
    parser.add_argument("--per-config-s", type=float, default=300)
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every configuration this many times, interleaved; report the median")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--logs", type=Path, default=None, help="folder for each configuration's output")
    parser.add_argument("--from-json", type=Path, action="append", default=[], help="render saved results")
    parser.add_argument("--write", type=Path, default=None, help="update this markdown file's section")
    args = parser.parse_args()

    if args.worker:
        common.emit_result(worker(json.loads(args.worker)))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    docs = []
    for path in args.from_json:
        docs.append(json.loads(path.read_text()))
    if not args.from_json:
        plan = GPU_PLAN if args.gpu else CPU_PLAN
        if args.only:
            plan = [p for p in plan if p[0] in args.only.split(",")]
        if args.seqs:
            plan = [p for p in plan if str(p[1]) in args.seqs.split(",")]
        if args.variants:
            keep = args.variants.split(",")
            plan = [(*p[:5], [v for v in p[5] if v in keep]) for p in plan]
        args.cache.mkdir(parents=True, exist_ok=True)
        if args.logs:
            args.logs.mkdir(parents=True, exist_ok=True)
        tokenizer = args.tokenizer or (save_tokenizer(args.cache / "tokenizer") if args.gpu else None)
        docs.append(run_plan(plan, args.cache, tokenizer, args.budget_s, args.per_config_s, args.json_out, args.logs,
                             args.profile, args.repeats))
    sections: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        gpu = bool(doc.get("gpu_peak_flops")) or bool(doc.get("gpu"))
        sections.setdefault("trainer-gpu" if gpu else "trainer-cpu", []).append(doc)
    for section, runs in sections.items():
        title = "Trainer throughput, GPU" if section == "trainer-gpu" else "Trainer throughput, CPU"
        if len(runs) == 1:
            text = render(runs[0], f"## {title}")
        else:  # several runs (device sessions): one sub-section each, ratios only within a run
            text = f"## {title}\n\n" + "\n".join(render(run, f"### Run {i} ({run['date']})")
                                                   for i, run in enumerate(runs, start=1))
        print(text)
        if args.write:
            common.update_section(args.write, section, text)


if __name__ == "__main__":
    main()
