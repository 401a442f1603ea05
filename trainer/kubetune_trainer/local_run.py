"""``kubetune run FILE``: run a FineTuneJob manifest on this machine, without a cluster.

Same code path as the pod (:func:`kubetune_trainer.sft.train`), with a local context: no status
channel (progress lines go to stdout instead), scratch space in ``$KUBETUNE_WORK_DIR`` or
``./.kubetune-work/<name>``, storage credentials from the environment (``AWS_*``)::

    kubetune run examples/finetunejob.yaml --output ./out --max-steps 20
    kubetune run job.yaml --output s3://scratch/try-1      # keeps S3, with spec.storage's endpoint

Exit codes are the pod's (:mod:`kubetune.contract`): 0 done, 2 invalid spec, 3 invalid dataset, ...
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from kubetune import api, contract
from kubetune_trainer import runtime


def apply_overrides(spec: api.FineTuneJobSpec, output: str | None, max_steps: int | None) -> api.FineTuneJobSpec:
    """``--output`` (a local folder or s3://) and ``--max-steps`` on top of the manifest."""
    update: dict[str, Any] = {}
    if output:
        uri = output if output.startswith("s3://") else str(Path(output).resolve())
        # output.uri only admits s3:// in the API; a local folder is a kubetune-run-only extension.
        update["output"] = api.S3Output.model_construct(uri=uri)
    if max_steps is not None:
        update["training"] = spec.training.model_copy(update={"max_steps": max_steps, "epochs": None})
    return spec.model_copy(update=update) if update else spec


def local_context(name: str | None) -> runtime.PodContext:
    work = Path(os.environ.get(contract.ENV_WORK_DIR) or Path.cwd() / ".kubetune-work" / (name or "run"))
    work.mkdir(parents=True, exist_ok=True)
    return runtime.PodContext(
        kind="FineTuneJob", name=name, namespace=None, work_dir=work,
        reporter=runtime.StatusReporter(None, None, None, None, None, None),
        termination_log=work / "termination-log",
    )


def run_manifest(path: Path, output: str | None, max_steps: int | None) -> int:
    """Validate the manifest, train, print the result; returns the exit code."""
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError:
        doc = {}
    name = (doc.get("metadata") or {}).get("name") if isinstance(doc, dict) else None
    ctx = local_context(name)

    def recipe(ctx: runtime.PodContext) -> dict[str, Any]:
        from kubetune_trainer import sft

        spec = apply_overrides(runtime.load_spec(str(path), api.FineTuneJobSpec), output, max_steps)
        click.echo(f"kubetune run: {name or path} -> {spec.output.uri} (work dir {ctx.work_dir})")
        return sft.train(spec, ctx, echo=click.echo)

    code = runtime.run_entry("FineTuneJob", recipe, ctx=ctx)
    if ctx.termination_log.is_file():
        message = json.loads(ctx.termination_log.read_text())
        click.echo(json.dumps(message, indent=2))
    return code
