"""Benchmark: merge wall time and peak memory vs a plain load + save of the same model (not a test).

    python tests/merge/bench_merge.py MODEL_DIR [--dtype bfloat16] [--repeats 2]
    python tests/merge/bench_merge.py ~/.cache/kubetune/models/smollm2-135m-instruct

Builds an all-linear r=16 LoRA on MODEL_DIR, publishes it with its kubetune manifest into a LOCAL
folder (``Store`` treats paths like s3:// uris, so no S3 server is involved), then alternates, each
in a fresh process so peak RSS is its own:
  * ``merge``: :func:`kubetune_trainer.merge.merge` end to end (load, verify, merge, save, reload
    check, generate one sample, copy out, manifest);
  * ``plain``: ``AutoModelForCausalLM.from_pretrained(dtype) + save_pretrained`` of the base.
Prints one JSON line per run and a summary. On a CUDA machine both run on the GPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child_merge(work: Path, dtype: str) -> dict[str, object]:
    from kubetune_trainer import merge as merge_recipe
    from kubetune_trainer import storage
    from kubetune_trainer.runtime import PodContext, StatusReporter

    from kubetune import api

    out = work / "merged-out"
    shutil.rmtree(out, ignore_errors=True)
    spec = api.MergeJobSpec.model_construct(  # local folders: bypass the s3:// pattern of the API
        source=api.MergeSource.model_construct(adapter_uri=str(work / "adapter-pub"), base_model=None,
                                               fine_tune_job_ref=None),
        dtype=dtype, output=api.S3Output.model_construct(uri=str(out)), storage=None,
        verify=api.Verify(prompts=["What is the capital of France?"], max_new_tokens=16),
    )
    ctx = PodContext(kind="MergeJob", name=None, namespace=None, work_dir=work / "pod",
                     reporter=StatusReporter(None, None, None, None, None, None), termination_log=work / "term")
    started = time.monotonic()
    result = merge_recipe.merge(spec, ctx)
    seconds = time.monotonic() - started
    manifest = storage.read_manifest(storage.Store(), str(out))
    assert manifest is not None
    return {"seconds": round(seconds, 2), "timings": manifest["timings"], "verification": result["verification"],
            "details": manifest["verificationDetails"], "sample": result["samples"][0]["output"]}


def child_plain(work: Path, dtype: str, base: Path) -> dict[str, object]:
    import torch
    from kubetune_trainer.merge import MAX_SHARD_SIZE
    from transformers import AutoModelForCausalLM

    out = work / "plain-out"
    shutil.rmtree(out, ignore_errors=True)
    started = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype), low_cpu_mem_usage=True,
                                                 device_map="auto" if torch.cuda.is_available() else None)
    model.save_pretrained(out, max_shard_size=MAX_SHARD_SIZE)
    return {"seconds": round(time.monotonic() - started, 2)}


def prepare(base: Path, work: Path) -> None:
    sys.path.insert(0, str(HERE))
    from kubetune_trainer import storage
    from merge_helpers import build_adapter, finetune_spec

    adapter = build_adapter(base, work / "adapter", std=0.01, r=16, lora_alpha=32)
    store = storage.Store()
    files = store.upload_dir(adapter, str(work / "adapter-pub"))
    storage.write_manifest(store, str(work / "adapter-pub"), files, spec=finetune_spec({"name": str(base)}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", choices=["merge", "plain"])
    parser.add_argument("--work", type=Path)
    args = parser.parse_args()
    if args.child:
        started = time.monotonic()
        fn = child_merge(args.work, args.dtype) if args.child == "merge" else \
            child_plain(args.work, args.dtype, args.model)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"run": args.child, **fn, "processSeconds": round(time.monotonic() - started, 2),
                          "peakRssMiB": round(peak)}))
        return

    work = Path(tempfile.mkdtemp(prefix="kt-bench-merge-"))
    try:
        prepare(args.model.resolve(), work)
        runs: dict[str, list[dict[str, object]]] = {"merge": [], "plain": []}
        for _ in range(args.repeats):
            for kind in ("plain", "merge"):
                out = subprocess.run([sys.executable, __file__, str(args.model.resolve()), "--dtype", args.dtype,
                                      "--child", kind, "--work", str(work)], check=True, capture_output=True,
                                     text=True).stdout.strip().splitlines()[-1]
                print(out, flush=True)
                runs[kind].append(json.loads(out))
        summary = {kind: {"medianSeconds": statistics.median(float(r["seconds"]) for r in rs),  # type: ignore[arg-type]
                          "maxPeakRssMiB": max(int(r["peakRssMiB"]) for r in rs)}  # type: ignore[call-overload]
                   for kind, rs in runs.items()}
        summary["ratio"] = round(summary["merge"]["medianSeconds"] / summary["plain"]["medianSeconds"], 2)
        print(json.dumps({"summary": summary, "dtype": args.dtype, "model": str(args.model)}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
