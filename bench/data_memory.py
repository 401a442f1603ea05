"""Data loading memory: peak RSS and time of ``data.load_splits`` on a JSONL file of ≥ 1 GB.

    .venv/bin/python bench/data_memory.py --write docs/benchmarks.md
    .venv/bin/python bench/data_memory.py --size-mb 20 --old-size-mb 20       # quick check of the script

Writes (under ``--tmp``, deleted afterwards) JSONL files of ``--size-mb`` MB each: ``template``
rows (``question``/``answer``, 2-4 KB a row, dataset.template ``Question: {question}\\n\\nAnswer:
{answer}``), ``text`` rows (one ``text`` of the same lengths) and ``messages`` rows (the same
question and answer as a user and an assistant message). Each measurement runs in a fresh
Python process: imports first, then its clock and ``data.load_splits`` (load, row checks, TRL's
columns; no tokenizer), then it reports the wall time, the peak RSS (VmHWM) and the peak of its
private (anonymous) memory, sampled every 50 ms (RssAnon): memory-mapped Arrow pages the process has
read count in RSS but are page cache the kernel can drop, private memory cannot be dropped.

* ``new`` — this tree's ``kubetune_trainer`` (Arrow, memory-mapped, under the work dir).
* ``old`` — ``kubetune_trainer/data.py`` of ``--old-ref`` (default 16850bd, the last Python-rows
  loader) in a copy of this tree's package, first on ``sys.path``
  (``git show REF:trainer/kubetune_trainer/data.py``): every row as Python objects, then an
  in-memory ``datasets.Dataset``. It runs on ``--old-size-mb`` files, since it needs about 10× the
  data in memory; a worker whose private memory passes ``--rss-cap-gb`` stops
  itself and is reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for _path in (REPO / "bench", REPO / "hack", REPO / "trainer", REPO):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import common  # noqa: E402

TEMPLATE = "Question: {question}\n\nAnswer: {answer}"
FORMATS = ("template", "text", "messages")
WORDS = ("the model data training token adapter cluster node memory batch gradient loss rank layer "
         "weight quantized storage bucket object request response question answer example shows how "
         "to configure deploy scale measure retry schedule queue worker process kernel cache file "
         "arrow parquet json line column row split shard checkpoint resume evaluate compare ").split()


def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def write_data(path: Path, fmt: str, size_mb: int, seed: int = 0) -> dict[str, Any]:
    """JSONL rows of 2-4 KB until the file holds ``size_mb`` MB."""
    rng = random.Random(seed)
    sentences = [" ".join(rng.choices(WORDS, k=rng.randint(6, 20))).capitalize() + "." for _ in range(4000)]

    def text(n_bytes: int) -> str:
        parts, size = [], 0
        while size < n_bytes:
            s = sentences[rng.randrange(len(sentences))]
            parts.append(s)
            size += len(s) + 1
        return " ".join(parts)

    target, rows, written = size_mb * 1_000_000, 0, 0
    with path.open("w") as fh:
        while written < target:
            total = rng.randint(2000, 4000)
            question = text(rng.randint(200, total // 3))
            answer = text(total - len(question))
            if fmt == "template":
                row: dict[str, Any] = {"question": question, "answer": answer, "id": rows}
            elif fmt == "text":
                row = {"text": TEMPLATE.format(question=question, answer=answer), "id": rows}
            else:
                row = {"messages": [{"role": "user", "content": question},
                                    {"role": "assistant", "content": answer}], "id": rows}
            line = json.dumps(row) + "\n"
            fh.write(line)
            written += len(line)
            rows += 1
    return {"rows": rows, "bytes": written}


def old_tree(ref: str, dest: Path) -> Path:
    """This tree's ``kubetune_trainer`` with ``data.py`` as of ``ref``: a ``trainer/``-like folder."""
    pkg = dest / "kubetune_trainer"
    shutil.copytree(REPO / "trainer" / "kubetune_trainer", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    source = subprocess.run(["git", "show", f"{ref}:trainer/kubetune_trainer/data.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    (pkg / "data.py").write_text(source)
    return dest


def worker(cfg: dict[str, Any]) -> dict[str, Any]:
    if cfg.get("trainer_src"):
        sys.path.insert(0, cfg["trainer_src"])
    import datasets  # noqa: F401  (imported before the clock starts)
    import pyarrow  # noqa: F401
    from kubetune_trainer import data
    from kubetune_trainer.storage import Store

    from kubetune import api

    assert not cfg.get("trainer_src") or data.__file__.startswith(cfg["trainer_src"]), data.__file__
    cap_mib = cfg["rss_cap_gb"] * 1024
    peak_anon = [0.0]
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.05):
            anon = _status("RssAnon")
            peak_anon[0] = max(peak_anon[0], anon)
            if anon > cap_mib:
                common.emit_result({"error": f"private memory passed the cap of {cfg['rss_cap_gb']} GiB",
                                    "capped": True, "peak_rss_mib": common.peak_rss_mib(),
                                    "peak_anon_mib": peak_anon[0]})
                sys.stdout.flush()
                os._exit(9)

    threading.Thread(target=watch, daemon=True).start()
    fields: dict[str, Any] = {"source": "jsonl", "uri": cfg["file"], "format": cfg["format"]}
    if cfg["format"] == "template":
        fields["template"] = TEMPLATE
    spec = api.Dataset.model_validate(fields)
    store = Store.from_spec(api.Storage(endpoint="http://127.0.0.1:9"))  # unused: local files
    before = _status("VmRSS")
    started = time.perf_counter()
    splits = data.load_splits(spec, store, Path(cfg["work"]), seed=0)
    wall = time.perf_counter() - started
    done.set()
    peak_anon[0] = max(peak_anon[0], _status("RssAnon"))
    cache = sum(f.stat().st_size for f in Path(cfg["work"]).rglob("*") if f.is_file())
    return {"wall_s": round(wall, 2), "rows": len(splits.train), "rss_before_mib": round(before),
            "peak_rss_mib": round(common.peak_rss_mib()), "peak_anon_mib": round(peak_anon[0]),
            "rss_after_mib": round(_status("VmRSS")), "work_dir_mib": round(cache / 2**20),
            "arrow_backed": bool(getattr(splits.train, "cache_files", None))}


def render(doc: dict[str, Any]) -> str:
    lines = [
        "## Data loading memory", "",
        f"Date {doc['date']}; machine: {common.describe_machine(doc['machine'])}; "
        f"{common.describe_versions(doc['versions'])}.", "",
        "Commands: " + "; ".join(f"`{c}`" for c in doc.get("commands") or [doc["command"]]) + ". "
        "`data.load_splits` on one JSONL file (template rows: question/answer, 2-4 KB a row; text rows: the "
        "rendered template; messages rows: the same as a user and an assistant message), each run in a fresh "
        "process, no tokenizer. "
        f"`old`: data.py of {doc['old_ref']} (Python rows, then an in-memory dataset); `new`: this tree "
        "(Arrow, memory-mapped from the work dir). Peak RSS is VmHWM (it counts memory-mapped Arrow pages "
        "read, which are page cache); private is the sampled peak of RssAnon; RSS before is after imports.", "",
    ]
    rows = []
    for r in doc["runs"]:
        res = r["result"]
        if "error" in res and not res.get("capped"):
            rows.append([r["size_mb"], r["format"], r["code"], "error: " + res["error"][:120], "", "", "", "", ""])
            continue
        rows.append([f"{r['size_mb']:,}", r["format"], r["code"], f"{r['rows']:,}",
                     "stopped at the cap" if res.get("capped") else common.fmt(res.get("wall_s"), 1),
                     common.fmt(res.get("peak_rss_mib"), 0), common.fmt(res.get("peak_anon_mib"), 0),
                     common.fmt(res.get("rss_before_mib"), 0), common.fmt(res.get("work_dir_mib"), 0)])
    lines.append(common.table(["file MB", "format", "code", "rows", "seconds", "peak RSS MiB", "peak private MiB",
                               "RSS before MiB", "work dir MiB"], rows).rstrip())
    growth = []  # peak private memory, old vs new on the same file
    for r in doc["runs"]:
        new = next((n["result"] for n in doc["runs"] if n["code"] == "new" and n["format"] == r["format"]
                    and n["size_mb"] == r["size_mb"] and "peak_anon_mib" in n["result"]), None)
        if r["code"] == "old" and "error" not in r["result"] and new:
            old_mib, new_mib = r["result"]["peak_anon_mib"], new["peak_anon_mib"]
            growth.append(f"{r['format']} {r['size_mb']:,} MB: {old_mib:,.0f} vs {new_mib:,.0f} MiB "
                          f"({old_mib / new_mib:.1f}×)")
    if growth:
        lines += ["", "Peak private memory, old vs new on the same file: " + "; ".join(dict.fromkeys(growth)) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--size-mb", type=int, default=1100, help="JSONL file size for the new code")
    parser.add_argument("--old-size-mb", type=int, default=256, help="JSONL file size for the old code (0: skip)")
    parser.add_argument("--old-ref", default="16850bd",
                        help="git revision of the old data.py (the last Python-rows loader)")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--rss-cap-gb", type=float, default=12.0, help="a worker stops above this private memory")
    parser.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--timeout", type=float, default=1800, help="per worker, seconds")
    parser.add_argument("--from-json", type=Path, action="append", default=[],
                        help="put the runs of an earlier --json-out before this invocation's (repeatable)")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--write", type=Path, default=None, help="update this markdown file's section")
    args = parser.parse_args()
    if args.worker:
        common.emit_result(worker(json.loads(args.worker)))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    root = Path(tempfile.mkdtemp(prefix="kt-bench-data-memory-", dir=args.tmp))
    earlier = [json.loads(p.read_text()) for p in args.from_json]
    runs: list[dict[str, Any]] = [{**r, "command": d["command"]} for d in earlier for r in d["runs"]]
    try:
        old_src = str(old_tree(args.old_ref, root / "old-trainer")) if args.old_size_mb else None
        sizes = sorted({args.size_mb, *([args.old_size_mb] if args.old_size_mb else [])})
        for fmt in args.formats.split(","):
            for size in sizes:
                path = root / f"{fmt}-{size}mb.jsonl"
                info = write_data(path, fmt, size)
                print(f"wrote {path} ({info['bytes'] / 1e6:.0f} MB, {info['rows']} rows)", flush=True)
                codes = [("new", None)] if size == args.size_mb else []
                if size == args.old_size_mb:
                    codes = ([("new", None)] if size != args.size_mb else codes) + [("old", old_src)]
                for code, src in codes:
                    work = root / f"work-{fmt}-{size}-{code}"
                    cfg = {"file": str(path), "format": fmt, "work": str(work), "trainer_src": src,
                           "rss_cap_gb": args.rss_cap_gb}
                    result = common.run_worker(Path(__file__), cfg, timeout=args.timeout)
                    print(fmt, size, code, json.dumps(result), flush=True)
                    runs.append({"format": fmt, "size_mb": round(info["bytes"] / 1e6), "rows": info["rows"],
                                 "code": code, "result": result, "command": common.command_line()})
                    shutil.rmtree(work, ignore_errors=True)
                path.unlink()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    doc = {"date": common.now_utc(), "machine": common.machine(), "versions": common.versions(),
           "command": common.command_line(), "commands": list(dict.fromkeys(r["command"] for r in runs)),
           "old_ref": args.old_ref, "runs": runs}
    if args.json_out:
        args.json_out.write_text(json.dumps(doc, indent=2))
    text = render(doc)
    print(text)
    if args.write:
        common.update_section(args.write, "data-memory", text)


if __name__ == "__main__":
    main()
