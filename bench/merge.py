"""Merge benchmark: a MergeJob's wall time vs the I/O bound (plain download + load + save + upload).

    .venv/bin/python bench/merge.py --write docs/benchmarks.md
    .venv/bin/python bench/merge.py --model tiny --repeats 1      # quick check of the script itself

Setup (once per run): a real S3-compatible server on 127.0.0.1 (moto, ``hack/localenv.S3Server``),
the base model (SmolLM2-135M-Instruct, from the wheel's GGUF) uploaded to it, and an adapter made
with peft directly (all-linear LoRA r 16, random non-zero ``lora_B``) published with the
``manifest.json`` the trainer writes (``kind: adapter``, ``spec``, ``baseModel``).

Measured, each in its own Python process, ``--repeats`` times, the fastest kept. Both workers import
torch and transformers before their clock starts (what either imports lazily later, e.g. a model
class, is in its number):

* ``merge`` — :func:`kubetune_trainer.merge.merge` on a MergeJobSpec with default settings
  (``dtype`` bfloat16 unless ``--dtype``; no verify prompts): download, load, probe logits, merge,
  save, reload + verify, upload. Its own per-phase timings and merge method (``direct`` or
  ``peft``) come from the result manifest.
* ``io`` — the same bytes without the merge: download the base, ``from_pretrained`` in the same
  dtype, ``save_pretrained`` with the same shard size, upload. The floor any merge must pay.

Goal: merge ≤ 1.3× io.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for _path in (REPO / "bench", REPO / "hack", REPO / "trainer", REPO):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import common  # noqa: E402

BUCKET = "bench-merge"


def store_from_env() -> Any:
    from kubetune_trainer import storage

    return storage.Store(endpoint=os.environ["AWS_ENDPOINT_URL"], access_key=os.environ["AWS_ACCESS_KEY_ID"],
                         secret_key=os.environ["AWS_SECRET_ACCESS_KEY"])


def build_adapter(base_dir: Path, out: Path, r: int = 16, seed: int = 0) -> Path:
    """An all-linear LoRA with random non-zero lora_B (what training would produce)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                                  target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    peft_model.save_pretrained(out)
    return out


def publish(base_dir: Path, adapter_dir: Path) -> tuple[str, str]:
    """Upload the base and the adapter (manifest written last, as the trainer does)."""
    from kubetune_trainer import storage

    from kubetune import api

    store = store_from_env()
    base_uri = f"s3://{BUCKET}/bases/{base_dir.name}"
    store.upload_dir(base_dir, base_uri)
    adapter_uri = f"s3://{BUCKET}/runs/{base_dir.name}/adapter"
    files = store.upload_dir(adapter_dir, adapter_uri)
    spec = api.FineTuneJobSpec.model_validate({
        "model": {"uri": base_uri}, "lora": {"r": 16, "alpha": 32},
        "dataset": {"source": "jsonl", "uri": f"s3://{BUCKET}/data/train.jsonl"},
        "training": {"maxSteps": 10}, "output": {"uri": f"s3://{BUCKET}/runs/{base_dir.name}"},
    })
    storage.write_manifest(store, adapter_uri, files, kind="adapter", spec=spec.to_wire(),
                           baseModel=spec.model.to_wire())
    return base_uri, adapter_uri


# ----------------------------------------------------------------------------------------------
# Workers
# ----------------------------------------------------------------------------------------------


def run_merge(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch  # noqa: F401  (imported before the clock starts, as in run_io)
    from kubetune_trainer import merge
    from kubetune_trainer.runtime import PodContext, StatusReporter
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401  (as in run_io)

    from kubetune import api

    work = Path(tempfile.mkdtemp(prefix="kt-bench-merge-"))
    spec = api.MergeJobSpec.model_validate({
        "source": {"adapterUri": cfg["adapter_uri"]}, "dtype": cfg["dtype"],
        "output": {"uri": f"s3://{BUCKET}/merged/{cfg['tag']}"},
        "storage": {"endpoint": os.environ["AWS_ENDPOINT_URL"]},
    })
    ctx = PodContext(kind="MergeJob", name="bench", namespace=None, work_dir=work,
                     reporter=StatusReporter(None, None, None, None, None, None),
                     termination_log=work / "termination-log")
    started = time.perf_counter()
    result = merge.merge(spec, ctx)
    wall = time.perf_counter() - started
    manifest = store_from_env().get_json(f"{spec.output.uri}/manifest.json") or {}
    shutil.rmtree(work, ignore_errors=True)
    return {"wall_s": wall, "timings": manifest.get("timings"), "verification": result.get("verification"),
            "method": manifest.get("mergeMethod"), "peak_rss_mib": common.peak_rss_mib()}


def run_io(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch
    from kubetune_trainer import merge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store = store_from_env()
    work = Path(tempfile.mkdtemp(prefix="kt-bench-io-"))
    timings: dict[str, float] = {}
    started = time.perf_counter()
    store.download_dir(cfg["base_uri"], work / "base")
    timings["download"] = time.perf_counter() - started
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(work / "base", dtype=getattr(torch, cfg["dtype"]),
                                                 low_cpu_mem_usage=True)
    tokenizer = AutoTokenizer.from_pretrained(work / "base")
    timings["load"] = time.perf_counter() - t
    t = time.perf_counter()
    model.save_pretrained(work / "out", max_shard_size=merge.MAX_SHARD_SIZE)
    tokenizer.save_pretrained(work / "out")
    timings["save"] = time.perf_counter() - t
    t = time.perf_counter()
    store.upload_dir(work / "out", f"s3://{BUCKET}/io/{cfg['tag']}")
    timings["upload"] = time.perf_counter() - t
    wall = time.perf_counter() - started
    shutil.rmtree(work, ignore_errors=True)
    return {"wall_s": wall, "timings": {k: round(v, 3) for k, v in timings.items()},
            "peak_rss_mib": common.peak_rss_mib()}


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def render(doc: dict[str, Any]) -> str:
    rows = []
    for entry in doc["results"]:
        io, mg = entry.get("io") or {}, entry.get("merge") or {}
        phases = mg.get("timings") or {}
        rows.append([entry["model"], entry["dtype"], mg.get("method"), io.get("wall_s"), mg.get("wall_s"),
                     common.ratio(mg.get("wall_s"), io.get("wall_s")),
                     ", ".join(f"{k} {v:.1f}" for k, v in phases.items() if k != "total") or mg.get("error"),
                     ", ".join(f"{k} {v:.1f}" for k, v in (io.get("timings") or {}).items()) or io.get("error"),
                     io.get("peak_rss_mib"), mg.get("peak_rss_mib")])
    headers = ["model", "dtype", "merge method", "io bound (s)", "merge (s)", "merge ÷ io", "merge phases (s)",
               "io phases (s)", "io peak RSS (MiB)", "merge peak RSS (MiB)"]
    m = doc["machine"]
    return "\n".join([
        "## Merge", "",
        f"- Command: `{doc['command']}`", f"- Machine: {common.describe_machine(m)}",
        f"- Versions: {common.describe_versions(doc['versions'])}", f"- Date: {doc['date']}",
        f"- Best of {doc['repeats']} runs each, each in a fresh process; S3 = moto server on 127.0.0.1. "
        "Goal: merge ≤ 1.3× io.", "",
        common.table(headers, rows),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    parser.add_argument("--dtype", default="bfloat16,float32", help="comma-separated dtypes")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--from-json", type=Path, action="append", default=[],
                        help="render saved runs (several: their rows in one table)")
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    if args.worker:
        cfg = json.loads(args.worker)
        common.emit_result(run_merge(cfg) if cfg["what"] == "merge" else run_io(cfg))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.from_json:
        runs = [json.loads(path.read_text()) for path in args.from_json]
        doc = {**runs[0], "results": [r for run in runs for r in run["results"]],
               "command": "; ".join(dict.fromkeys(run["command"] for run in runs))}
    else:
        doc = measure(args)
    text = render(doc)
    print(text)
    if args.write:
        common.update_section(args.write, "merge", text)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import localenv

    doc: dict[str, Any] = {"date": common.now_utc(), "machine": common.machine(), "versions": common.versions(),
                           "command": common.command_line(), "repeats": args.repeats, "results": []}
    tmp = Path(tempfile.mkdtemp(prefix="kt-bench-merge-"))
    try:
        with localenv.S3Server() as s3:
            env = {**s3.env, "AWS_ENDPOINT_URL": s3.endpoint}
            os.environ.update(env)
            s3.make_bucket(BUCKET)
            base_dir = localenv.smollm2_dir() if args.model == "smollm2" else localenv.tiny_model_dir(tmp / "tiny")
            adapter_dir = build_adapter(base_dir, tmp / "adapter")
            base_uri, adapter_uri = publish(base_dir, adapter_dir)
            for dtype in args.dtype.split(","):
                entry: dict[str, Any] = {"model": args.model, "dtype": dtype}
                for what in ("io", "merge"):
                    runs = []
                    for i in range(args.repeats):
                        cfg = {"what": what, "dtype": dtype, "base_uri": base_uri, "adapter_uri": adapter_uri,
                               "tag": f"{dtype}-{i}"}
                        result = common.run_worker(Path(__file__), cfg, timeout=600, env=env)
                        print(what, dtype, json.dumps(result), flush=True)
                        runs.append(result)
                    good = [r for r in runs if not r.get("error")]
                    entry[what] = min(good, key=lambda r: r["wall_s"]) if good else runs[-1]
                    entry[what + "_all_s"] = [r.get("wall_s") for r in runs]
                doc["results"].append(entry)
                if args.json_out:
                    args.json_out.write_text(json.dumps(doc, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return doc


if __name__ == "__main__":
    main()
