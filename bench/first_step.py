"""GPU-pod time to first step: how long the pod that holds the GPU works before its first training
step, with the prepare stage inline (one pod does everything, as before issue #18) and with the CPU
prepare stage run first (spec.prepare.mode separate, the default), with and without a model cache.

    .venv/bin/python bench/first_step.py --write docs/benchmarks.md

SmolLM2-135M-Instruct (float32, 517 MB) and a JSONL dataset (``--rows`` instruction/response rows,
bench/trainer.py's generator) on a real S3-compatible server on 127.0.0.1 (moto). Each "pod" is a
fresh Python process with an empty work dir running what the pod runs (:func:`sft.train` /
:func:`prepare.run`) with the spec of ``hack/demo.py``'s FineTuneJob (4-bit NF4 QLoRA, bfd packing,
maxLength 512); the clock starts before the process starts (the imports count, as in a pod) and
stops when the trainer reports ``training from step 0``, just before the first step (whose own
time does not depend on the stage). Fastest of ``--repeats``. No container start or image pull is
counted (the same in both cases).
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "hack"))
import common  # noqa: E402
import localenv  # noqa: E402

SCRIPT = Path(__file__).resolve()


def spec_doc(model_uri: str, data_uri: str, out: str, endpoint: str) -> dict[str, Any]:
    return {"model": {"uri": model_uri}, "quantization": {"bits": 4},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
            "dataset": {"source": "jsonl", "uri": data_uri, "format": "template",
                        "template": common.trainer_bench().TEMPLATE,
                        "eval": {"fraction": 0.02, "maxSamples": 64}},
            "training": {"maxSteps": 10, "maxLength": 512, "batchSize": 2, "packing": "bfd",
                         "gradientCheckpointing": False, "maxTruncatedFraction": 1.0},
            "output": {"uri": out}, "storage": {"endpoint": endpoint}}


def worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """One pod: ``train`` until the first step starts, or ``prepare`` to its end."""
    from kubetune_trainer import prepare, runtime, sft

    from kubetune import api

    t0 = cfg["t0"]
    imported = time.time() - t0
    marks: dict[str, float] = {}

    class Clock(runtime.StatusReporter):
        def __init__(self) -> None:
            super().__init__(None, None, None, None, None, None)

        def patch(self, status: dict[str, Any]) -> bool:
            stage = str(status.get("stage") or "")
            if stage:
                marks.setdefault(stage[:40], round(time.time() - t0, 2))
            if stage.startswith("training from step"):
                common.emit_result({"first_step_s": time.time() - t0, "imports_s": imported, "marks": marks})
                os._exit(0)
            return True

    work = Path(cfg["work"])
    ctx = runtime.PodContext(kind="FineTuneJob", name="bench", namespace=None, work_dir=work, reporter=Clock(),
                             termination_log=work / "termination-log")
    spec = api.FineTuneJobSpec.model_validate(cfg["spec"])
    if cfg["stage"] == "prepare":
        data = prepare.run(spec, ctx)["data"]
        return {"prepare_s": time.time() - t0, "imports_s": imported, "rows": data["trainingRows"],
                "tokens": data["tokens"]}
    sft.train(spec, ctx)
    return {"error": "training ended without reporting its first step"}


def pod(stage: str, spec: dict[str, Any], root: Path, env: dict[str, str], cache: Path | None) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"{stage}-", dir=root))
    extra = {**env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true"}
    if cache is not None:
        extra["KUBETUNE_MODEL_CACHE"] = str(cache)
    else:
        os.environ.pop("KUBETUNE_MODEL_CACHE", None)
    result = common.run_worker(SCRIPT, {"t0": time.time(), "stage": stage, "spec": spec, "work": str(work)},
                               timeout=1800, env=extra)
    shutil.rmtree(work, ignore_errors=True)
    if "error" in result:
        raise RuntimeError(f"{stage}: {result['error']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--write", type=Path, default=None, help="update this markdown file's section")
    args = parser.parse_args()
    if args.worker:
        common.emit_result(worker(json.loads(args.worker)))
        return
    model = localenv.smollm2_dir()
    bt = common.trainer_bench()
    rows = bt.make_rows(args.rows * 200, 190 / 1.35, 1.0, int(4 * 512 / 1.35), seed=0)[:args.rows]
    with localenv.S3Server() as s3, tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        s3.make_bucket("bench-first-step")
        model_uri = s3.upload_dir(model, "bench-first-step", "smollm2")
        s3.client().put_object(Bucket="bench-first-step", Key="data/train.jsonl",
                               Body="".join(json.dumps(r) + "\n" for r in rows).encode())
        data_uri = "s3://bench-first-step/data/train.jsonl"
        before, after, after_cache, prepares = [], [], [], []
        for i in range(args.repeats):
            # before: one pod prepares (nothing stored for this output folder) and trains
            spec = spec_doc(model_uri, data_uri, f"s3://bench-first-step/inline-{i}/run", s3.endpoint)
            before.append(pod("train", spec, root, s3.env, None))
            # after: the CPU prepare pod first, then the GPU pod reads its stored data
            spec = spec_doc(model_uri, data_uri, f"s3://bench-first-step/separate-{i}/run", s3.endpoint)
            cache = root / f"cache-{i}"
            cache.mkdir()
            prepares.append(pod("prepare", spec, root, s3.env, cache))
            after_cache.append(pod("train", spec, root, s3.env, cache))
            after.append(pod("train", spec, root, s3.env, None))
            shutil.rmtree(cache, ignore_errors=True)

    def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
        return min(runs, key=lambda r: r["first_step_s"])

    result = {"model": "SmolLM2-135M-Instruct (float32, 4-bit NF4 QLoRA)", "rows": args.rows,
              "training_rows": prepares[0]["rows"], "tokens": prepares[0]["tokens"], "repeats": args.repeats,
              "machine": common.machine(),
              "inline": best(before), "separate": best(after), "separate_model_cache": best(after_cache),
              "prepare_pod_s": min(p["prepare_s"] for p in prepares)}
    print(json.dumps(result, indent=1))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1) + "\n")
    if args.write:
        write(args.write, result)


def write(path: Path, r: dict[str, Any]) -> None:
    rows = [["inline: one GPU pod downloads, checks, tokenizes, loads", r["inline"]["first_step_s"], "0"],
            ["separate (default): the GPU pod after the CPU prepare pod", r["separate"]["first_step_s"],
             r["prepare_pod_s"]],
            ["separate + spec.modelCache (the prepare pod staged the model)", r["separate_model_cache"]["first_step_s"],
             r["prepare_pod_s"]]]
    saved = r["inline"]["first_step_s"] - r["separate_model_cache"]["first_step_s"]
    body = (f"## GPU-pod time to first step (prepare stage)\n\nMeasured {common.now_utc()} by "
            f"`{common.command_line()}` on {common.describe_machine(r['machine'])}: {r['model']}, "
            f"{r['rows']} JSONL rows ({r.get('training_rows', '?')} training samples after the row checks and the "
            f"held-out split, {r['tokens']:,} tokens) and the model on a local moto S3 server; each pod a "
            f"fresh process and work dir, the clock from before the process starts (imports "
            f"{r['inline']['imports_s']:.1f} s) to the trainer's `training from step 0`; fastest of "
            f"{r['repeats']}. No image pull or container start (the same for every row).\n\n"
            + common.table(["GPU pod", "seconds to first step", "CPU prepare pod before it (s)"], rows)
            + f"\nThe GPU is held {saved:.1f} s less per pod start here; the difference grows with the dataset "
            "(tokenizing is linear in it) and the model (a download per pod without the cache; 16 GB for an "
            "8B model in bf16), and applies again to every retry and resume. What is left is the imports, the "
            "4-bit load of the model and the trainer's setup.\n")
    common.update_section(path, "first-step", body)


if __name__ == "__main__":
    main()
