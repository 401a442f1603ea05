"""Will it fit? The peak-memory estimate (kubetune_trainer.memory) against what training really
allocates, on CPU: the tiny Llama and SmolLM2-135M, 4-bit NF4 QLoRA, float32 compute.

    .venv/bin/python bench/memory.py --write docs/benchmarks.md

Each configuration runs :func:`sft.train` for 3 steps in a fresh process whose glibc allocator
hands every block of 64 KiB or more to mmap (``MALLOC_MMAP_THRESHOLD_``, a fixed threshold), so
``mallinfo2().hblkhd`` counts the tensors' memory; a thread samples it every millisecond. What is
compared is what training adds once the trainer is built (the clock's mark: ``training from step
0``): activations, the dense sdpa mask, the adapter's gradients and AdamW states -- the part of the
estimate fitted on GPU peaks. The weights are counted exactly (tests/trainer/test_memory_estimate.py)
and on CPU partly stay in the memory-mapped safetensors file, outside the heap.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "hack"))
import common  # noqa: E402
import localenv  # noqa: E402

SCRIPT = Path(__file__).resolve()
CONFIGS = [  # (model, maxLength, gradient checkpointing)
    ("tiny", 512, True), ("tiny", 2048, True), ("tiny", 2048, False),
    ("smollm2", 256, True), ("smollm2", 1024, True), ("smollm2", 1024, False),
]


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap() -> int:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return int(info.hblkhd + info.uordblks)


def worker(cfg: dict[str, Any]) -> dict[str, Any]:
    from kubetune_trainer import memory, modeling, runtime, sft

    from kubetune import api

    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.monotonic(), heap()))
            time.sleep(0.001)

    marks: dict[str, float] = {}

    class Clock(runtime.StatusReporter):
        def __init__(self) -> None:
            super().__init__(None, None, None, None, None, None)

        def patch(self, status: dict[str, Any]) -> bool:
            if str(status.get("stage") or "").startswith("training from step"):
                marks["train"] = time.monotonic()
            return True

    work = Path(cfg["work"])
    spec = api.FineTuneJobSpec.model_validate(cfg["spec"])
    spec = spec.model_copy(update={"output": api.S3Output.model_construct(uri=str(work / "out"))})
    ctx = runtime.PodContext(kind="FineTuneJob", name="bench", namespace=None, work_dir=work, reporter=Clock(),
                             termination_log=work / "termination-log")
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    sft.train(spec, ctx)
    stop.set()
    thread.join()
    at = next(h for t, h in samples if t >= marks["train"])
    peak = max(h for t, h in samples if t >= marks["train"])
    from transformers import AutoConfig

    shape = memory.shape_of(AutoConfig.from_pretrained(cfg["model"]), spec.lora)
    est = memory.estimate(shape, memory.setup_for(spec, 4, varlen=False, on_gpu=False))
    setup = memory.setup_for(spec, 4, varlen=False, on_gpu=False)
    dynamic = est.activations + est.mask + shape.lora * (4 + setup.optimizer_state)
    return {"measured_mib": (peak - at) / 2**20, "estimated_mib": dynamic / 2**20, "samples": len(samples),
            "tokens": setup.tokens, "lora": shape.lora, "hidden": shape.hidden, "layers": shape.layers,
            "cuda": modeling.use_cuda()}


def rows(n: int, words: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(3000)]
    return [{"text": " ".join(rng.choice(vocab) for _ in range(words))} for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--write", type=Path, default=None, help="update this markdown file's section")
    args = parser.parse_args()
    if args.worker:
        common.emit_result(worker(json.loads(args.worker)))
        return
    models = {"smollm2": localenv.smollm2_dir()}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models["tiny"] = localenv.tiny_model_dir(root / "tiny")
        for model, length, checkpointing in CONFIGS:
            data = root / f"data-{length}.jsonl"
            data.write_text("".join(json.dumps(r) + "\n" for r in rows(64, length, 0)))
            spec = {"model": {"name": str(models[model])}, "quantization": {"bits": 4},
                    "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
                    "dataset": {"source": "jsonl", "uri": str(data), "format": "text"},
                    "training": {"maxSteps": 3, "maxLength": length, "batchSize": 2, "packing": "bfd",
                                 "gradientCheckpointing": checkpointing, "maxTruncatedFraction": 1.0,
                                 "saveSteps": 100},
                    "output": {"uri": "s3://unused/x"}, "resources": {"gpus": 0}, "prepare": {"mode": "inline"}}
            work = root / f"work-{model}-{length}-{checkpointing}"
            work.mkdir()
            result = common.run_worker(SCRIPT, {"spec": spec, "work": str(work), "model": str(models[model])},
                                       timeout=1800, env={"MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1"})
            result.update(model=model, max_length=length, checkpointing=checkpointing)
            print(json.dumps(result))
            results.append(result)
    out = {"date": common.now_utc(), "machine": common.machine(), "versions": common.versions(), "results": results}
    if args.json_out:
        args.json_out.write_text(json.dumps(out, indent=1) + "\n")
    if args.write:
        write(args.write, out)


def write(path: Path, out: dict[str, Any]) -> None:
    rows_ = [[r["model"], r["max_length"], "on" if r["checkpointing"] else "off", f"{r['estimated_mib']:,.0f}",
              f"{r['measured_mib']:,.0f}", f"{r['estimated_mib'] / r['measured_mib'] - 1:+.0%}"]
             for r in out["results"] if "measured_mib" in r]
    body = ("## Will it fit? The memory estimate on CPU\n\n"
            f"Measured {out['date']} by `{common.command_line()}` on {common.describe_machine(out['machine'])}. "
            "What training adds once the trainer is built (activations, the sdpa mask, the adapter's gradients "
            "and AdamW states), 4-bit NF4, LoRA r 16 on all linear layers, bfd packing, one packed row of "
            "maxLength a micro-batch, float32 compute; measured as the peak of glibc's mmapped heap "
            "(`MALLOC_MMAP_THRESHOLD_=65536`, `mallinfo2`) over 3 steps, minus its value when training started. "
            "The estimate's GPU calibration (three H100 peaks, within 5%) is in docs/trainer.md.\n\n"
            + common.table(["model", "maxLength", "checkpointing", "estimated MiB", "measured MiB", "error"], rows_))
    common.update_section(path, "memory", body)


if __name__ == "__main__":
    main()
