"""Model cache benchmark: what a retried pod (or a later job, or the MergeJob) spends getting its
base model, without spec.modelCache (downloaded again into the new pod's empty work dir) and with it
(read from the shared volume).

    .venv/bin/python bench/model_cache.py --write docs/benchmarks.md

SmolLM2-135M-Instruct (float32, 517 MB) is uploaded to a real S3-compatible server on 127.0.0.1
(moto, ``hack/localenv.S3Server``). Each pod is a fresh work dir; each number is
:func:`kubetune_trainer.modeling.resolve_model` for ``model.uri`` (tokenizer first, then the whole
model, as the recipe calls it), fastest of ``--repeats``:

* ``no cache`` — every pod downloads the model (today's retry);
* ``cache, first pod`` — downloads it into the cache (one atomic rename more);
* ``cache, later pod`` — a retry: the content digest (one LIST) and the cached folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "hack"))
import common  # noqa: E402
import localenv  # noqa: E402


def resolve(store, uri: str, work: Path, cache: Path | None) -> float:
    from kubetune_trainer import modeling

    from kubetune import api

    source = api.ModelSource(uri=uri)
    start = time.perf_counter()
    modeling.resolve_model(source, store, work, tokenizer_only=True, cache=cache)
    modeling.resolve_model(source, store, work, cache=cache)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", type=Path, default=None, help="update this markdown file's section")
    args = parser.parse_args()
    from kubetune_trainer.storage import Store

    from kubetune import api

    model = localenv.smollm2_dir()
    size = sum(p.stat().st_size for p in model.rglob("*") if p.is_file())
    with localenv.S3Server() as s3, tempfile.TemporaryDirectory() as tmp:
        s3.make_bucket("bench-cache")
        uri = s3.upload_dir(model, "bench-cache", "smollm2")
        store = Store.from_spec(api.Storage(endpoint=s3.endpoint), env=s3.env)
        root = Path(tmp)
        plain, first, later = [], [], []
        for i in range(args.repeats):
            plain.append(resolve(store, uri, root / f"plain-{i}", None))
            cache = root / f"cache-{i}"
            first.append(resolve(store, uri, root / f"first-{i}", cache))
            later.append(resolve(store, uri, root / f"later-{i}", cache))
            for p in root.iterdir():
                shutil.rmtree(p) if p.name.startswith(("plain", "first", "later")) else None
    result = {"model": "SmolLM2-135M-Instruct (float32)", "bytes": size, "no_cache_s": min(plain),
              "cache_first_s": min(first), "cache_later_s": min(later), "repeats": args.repeats,
              "machine": common.machine()}
    print(json.dumps(result, indent=1))
    if args.write:
        rows = [["no cache (every pod downloads)", result["no_cache_s"]],
                ["cache, first pod (downloads into it)", result["cache_first_s"]],
                ["cache, later pod (a retry, a later job, the MergeJob)", result["cache_later_s"]]]
        body = (f"## Model cache\n\nMeasured {common.now_utc()} by `{common.command_line()}` on "
                f"{common.describe_machine(result['machine'])}: the base model's time to be ready in a new pod, "
                f"{result['model']}, {size / 1e6:.0f} MB from a local moto S3 server, fastest of {args.repeats}.\n\n"
                + common.table(["pod", "seconds"], rows)
                + f"\nA retry saves {result['no_cache_s'] - result['cache_later_s']:.1f} s of "
                f"{result['no_cache_s']:.1f} s here; the saving grows with the model and with a real network "
                "(an 8B model in bf16 is 16 GB).\n")
        common.update_section(args.write, "model-cache", body)


if __name__ == "__main__":
    main()
