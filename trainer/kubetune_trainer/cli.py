"""``kubetune train``, ``kubetune merge`` and ``kubetune run``: thin wrappers around the recipes.

Only click is imported here; torch and friends load inside the recipes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from kubetune import contract


def _spec_option(fn):  # type: ignore[no-untyped-def]
    return click.option(
        "--spec", "spec_path", default=None, metavar="FILE|-",
        help=f"The spec (JSON/YAML, or a whole manifest); '-' reads stdin. Default: ${contract.ENV_SPEC_FILE} "
             f"or {contract.SPEC_FILE}.",
    )(fn)


def _resolve(spec_path: str | None) -> str:
    import os

    return spec_path or os.environ.get(contract.ENV_SPEC_FILE, contract.SPEC_FILE)


@click.command()
@_spec_option
def train(spec_path: str | None) -> None:
    """Fine-tune: packed QLoRA SFT for a FineTuneJob spec (what the operator's pod runs)."""
    from kubetune.api import FineTuneJobSpec
    from kubetune_trainer import distributed, runtime

    path = _resolve(spec_path)
    nproc, nnodes = distributed.world_from_env()
    if nproc * nnodes > 1:  # resources.gpus x resources.nodes > 1: torchrun runs the ranks
        ctx = runtime.PodContext.from_env("FineTuneJob")
        ctx.reporter.patch({"stage": f"starting {nproc} rank(s) in this pod, {nproc * nnodes} in all"})
        sys.exit(distributed.launch(["train", "--spec", path], ctx.work_dir, ctx.termination_log))

    def recipe(ctx: runtime.PodContext) -> dict:  # type: ignore[type-arg]
        from kubetune_trainer import sft

        return sft.train(runtime.load_spec(path, FineTuneJobSpec), ctx)

    sys.exit(runtime.run_entry("FineTuneJob", recipe))


@click.command()
@_spec_option
def prepare(spec_path: str | None) -> None:
    """Check, tokenize and store a FineTuneJob's data (CPU only; `train` reuses it)."""
    from kubetune.api import FineTuneJobSpec
    from kubetune_trainer import runtime

    path = _resolve(spec_path)

    def recipe(ctx: runtime.PodContext) -> dict:  # type: ignore[type-arg]
        from kubetune_trainer import prepare as prepare_stage

        return prepare_stage.run(runtime.load_spec(path, FineTuneJobSpec), ctx)

    sys.exit(runtime.run_entry("FineTuneJob", recipe))


@click.command()
@_spec_option
def merge(spec_path: str | None) -> None:
    """Merge an adapter into its base model and publish it (what a MergeJob's pod runs)."""
    from kubetune.api import MergeJobSpec
    from kubetune_trainer import runtime

    path = _resolve(spec_path)

    def recipe(ctx: runtime.PodContext) -> dict:  # type: ignore[type-arg]
        from kubetune_trainer import merge as merge_recipe

        return merge_recipe.merge(runtime.load_spec(path, MergeJobSpec), ctx)

    sys.exit(runtime.run_entry("MergeJob", recipe))


@click.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--output", default=None, help="Write results here (a local folder or s3://) instead of spec.output.uri.")
@click.option("--max-steps", type=int, default=None, help="Override training.maxSteps (a quick dry run).")
def run(file: Path, output: str | None, max_steps: int | None) -> None:
    """Run a FineTuneJob manifest locally, without a cluster, to debug a spec before spending GPU time."""
    from kubetune_trainer import local_run

    sys.exit(local_run.run_manifest(file, output=output, max_steps=max_steps))
