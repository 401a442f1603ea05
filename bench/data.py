"""Data preparation benchmark: from a formatted split to the packed rows SFTTrainer trains on.

    .venv/bin/python bench/data.py --write docs/benchmarks.md
    .venv/bin/python bench/data.py --rows 2000 --repeats 1          # quick check of the script itself

The data is the trainer benchmark's long-tailed instruction/response mix (``bench/trainer.py``),
``--rows`` samples (median ~190 tokens), as each of kubetune's three TRL layouts: ``text``
(template-formatted), ``promptCompletion`` and ``messages`` (SmolLM2's chat template). Packing
``bfd``, maxLength 2048, SmolLM2's tokenizer. Each configuration runs in its own Python process with
the tokenizer and the tiny model loaded before its clock starts; ``--repeats`` runs, fastest kept.

* ``trl`` — the classic path: the raw split into ``SFTTrainer`` (TRL adds EOS, tokenizes one sample
  at a time, builds labels, packs), ``dataset_num_proc`` unset.
* ``kubetune`` — what ``sft.train`` does: :func:`kubetune_trainer.data.tokenize` (TRL's tokenization,
  batched, in one process: the Rust tokenizer spreads each batch over the CPUs' threads),
  :func:`~kubetune_trainer.data.check_tokens` on its labels, then ``SFTTrainer`` on the tokenized
  split (it only packs).
* ``kubetune-procs`` — the same with ``datasets.map`` over one worker process per CPU
  (``tokenize(..., workers=N)``): what the trainer would gain from processes on top of the threads.

The path before ``data.tokenize`` (commit 407e2ea) was ``trl`` plus a separate token check, a second
tokenization of the split; docs/benchmarks.md records that check's time.
"""

from __future__ import annotations

import argparse
import json
import os
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

FORMATS = ("text", "promptCompletion", "messages")
VARIANTS = ("trl", "kubetune", "kubetune-procs")
MAX_LENGTH = 2048


def make_split(fmt: str, rows: int) -> Any:
    import datasets

    bt = common.trainer_bench()
    pairs = bt.make_rows(rows * 200, 190 / 1.35, 1.0, int(4 * MAX_LENGTH / 1.35), seed=0)[:rows]
    if fmt == "text":
        return datasets.Dataset.from_dict({"text": [bt.TEMPLATE.format(**p) for p in pairs]})
    if fmt == "promptCompletion":
        return datasets.Dataset.from_dict({"prompt": [p["instruction"] for p in pairs],
                                           "completion": [" " + p["response"] for p in pairs]})
    return datasets.Dataset.from_dict({"messages": [[{"role": "user", "content": p["instruction"]},
                                                     {"role": "assistant", "content": p["response"]}] for p in pairs]})


def worker(cfg: dict[str, Any]) -> dict[str, Any]:
    import localenv
    from kubetune_trainer import data, sft
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    from kubetune import api

    tokenizer = AutoTokenizer.from_pretrained(localenv.smollm2_dir())
    model = AutoModelForCausalLM.from_pretrained(localenv.tiny_model_dir(Path(cfg["cache"]) / "tiny"))
    split = make_split(cfg["format"], cfg["rows"])
    variant = cfg["variant"]
    workers = len(os.sched_getaffinity(0)) if variant == "kubetune-procs" else 1
    config = sft.sft_config(api.Training(maxSteps=1, maxLength=MAX_LENGTH, packing="bfd"),
                            Path(tempfile.mkdtemp(prefix="kt-bench-data-")), False, False, None)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    if variant == "trl":
        trainer = SFTTrainer(model=model, args=config, train_dataset=split, processing_class=tokenizer)
    else:
        t = time.perf_counter()
        tokenized = data.tokenize(split, tokenizer, workers=workers)
        timings["tokenize"] = time.perf_counter() - t
        t = time.perf_counter()
        stats = data.check_tokens(tokenized, MAX_LENGTH, "bfd")
        timings["check"] = time.perf_counter() - t
        t = time.perf_counter()
        trainer = SFTTrainer(model=model, args=config, train_dataset=tokenized, processing_class=tokenizer)
        timings["trl"] = time.perf_counter() - t
    wall = time.perf_counter() - started
    rows = trainer.train_dataset
    tokens = sum(len(ids) for ids in rows["input_ids"])
    return {"wall_s": wall, "timings": {k: round(v, 2) for k, v in timings.items()}, "workers": workers,
            "packed_rows": len(rows), "tokens": tokens, "cpus": len(os.sched_getaffinity(0)),
            "trainable_tokens": stats.trainable if variant != "trl" else None,
            "peak_rss_mib": common.peak_rss_mib()}


def render(doc: dict[str, Any]) -> str:
    lines = [
        "## Data preparation (tokenize, check, pack)", "",
        f"Date {doc['date']}; machine: {common.describe_machine(doc['machine'])}; "
        f"{common.describe_versions(doc['versions'])}.", "",
        f"Command: `{doc['command']}`. {doc['rows']} samples per format, bfd packing, maxLength {MAX_LENGTH}, "
        f"SmolLM2's tokenizer; fastest of {doc['repeats']}. Seconds from the formatted split to SFTTrainer's "
        "packed rows, each configuration in its own process (peak RSS is the main process only).", "",
    ]
    rows = []
    for fmt in doc["formats"]:
        base = doc["results"].get(f"{fmt}/trl", {}).get("wall_s")
        for variant in doc["variants"]:
            r = doc["results"].get(f"{fmt}/{variant}", {})
            if "error" in r:
                rows.append([fmt, variant, "error: " + r["error"][:120], "", "", "", ""])
                continue
            phases = ", ".join(f"{k} {v:.1f}" for k, v in (r.get("timings") or {}).items())
            rows.append([fmt, variant, common.fmt(r.get("wall_s"), 1), phases or "—", r.get("workers"),
                         common.fmt(common.ratio(base, r.get("wall_s"))), common.fmt(r.get("peak_rss_mib"), 0)])
    lines.append(common.table(["format", "path", "seconds", "phases (s)", "processes", "speed-up vs trl",
                               "peak RSS MiB"], rows))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "kubetune-bench")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--write", type=Path, default=None, help="update this markdown file's section")
    args = parser.parse_args()
    if args.worker:
        common.emit_result(worker(json.loads(args.worker)))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    args.cache.mkdir(parents=True, exist_ok=True)
    formats, variants = args.formats.split(","), args.variants.split(",")
    results: dict[str, dict[str, Any]] = {}
    for _ in range(args.repeats):
        for fmt in formats:
            for variant in variants:
                key = f"{fmt}/{variant}"
                r = common.run_worker(Path(__file__), {"format": fmt, "variant": variant, "rows": args.rows,
                                                       "cache": str(args.cache)}, timeout=1200)
                print(key, json.dumps(r), flush=True)
                best = results.get(key)
                if best is None or "error" in best or ("error" not in r and r["wall_s"] < best["wall_s"]):
                    results[key] = r
    doc = {"date": common.now_utc(), "machine": common.machine(), "versions": common.versions(),
           "command": common.command_line(), "rows": args.rows, "repeats": args.repeats, "formats": formats,
           "variants": variants, "results": results}
    if args.json_out:
        args.json_out.write_text(json.dumps(doc, indent=2))
    text = render(doc)
    print(text)
    if args.write:
        common.update_section(args.write, "data", text)


if __name__ == "__main__":
    main()
