"""The ``kubetune`` command: one entry point for the operator, the trainer and the tools.

    kubetune crds [--out crds/]            print or write the CRDs generated from kubetune.api
    kubetune validate FILE                 validate a FineTuneJob/MergeJob manifest locally
    kubetune operator [--namespace NS]...  run the operator (kopf)
    kubetune train --spec FILE|-           run the trainer for a FineTuneJob spec (in the pod)
    kubetune prepare --spec FILE|-         check, tokenize and store its data only (CPU; train reuses it)
    kubetune merge --spec FILE|-           run the merge for a MergeJob spec (in the pod)
    kubetune run FILE                      run a FineTuneJob manifest locally, without a cluster

Heavy imports (torch, kopf) happen inside the subcommands, so ``kubetune crds`` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import yaml
from pydantic import ValidationError

from kubetune import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kubetune")
def main() -> None:
    """kubetune: QLoRA fine-tuning as Kubernetes resources."""


@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write one YAML file per CRD into this folder instead of printing them.")
@click.option("--repo", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="Regenerate every generated file of a kubetune checkout (crds/, the chart's CRDs, docs/api.md).")
def crds(out: Path | None, repo: Path | None) -> None:
    """Print (or write) the CRDs generated from the API models."""
    from kubetune import crdgen

    if repo is not None:
        for path in crdgen.write_generated(repo):
            click.echo(f"wrote {path}")
        return
    if out is None:
        click.echo("---\n".join(crdgen.render().values()), nl=False)
        return
    for path in crdgen.write(out):
        click.echo(f"wrote {path}")


@main.command()
@click.argument("file", type=click.File("r"))
def validate(file: click.utils.LazyFile) -> None:
    """Validate FineTuneJob/MergeJob manifests (multi-document YAML) with the API models."""
    from kubetune.api import parse_manifest

    failed = False
    for doc in yaml.safe_load_all(file):
        if not doc:
            continue
        name = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name', '?')}"
        try:
            parse_manifest(doc)
        except (ValidationError, ValueError) as err:
            failed = True
            click.echo(f"{name}: invalid\n{err}", err=True)
        else:
            click.echo(f"{name}: valid")
    sys.exit(1 if failed else 0)


def _register_optional(module: str, attr: str) -> None:
    """Attach a subcommand that lives in the operator/trainer package, if that extra is installed."""
    try:
        mod = __import__(module, fromlist=[attr])
    except ModuleNotFoundError as err:  # the extra is not installed: say which
        missing = err.name

        @main.command(name=attr, context_settings={"ignore_unknown_options": True})
        @click.argument("args", nargs=-1, type=click.UNPROCESSED)
        def _missing(args: tuple[str, ...]) -> None:
            raise click.ClickException(
                f"'kubetune {attr}' needs the module {missing!r}: pip install 'kubetune[...]' with the "
                "operator or trainer extra"
            )

        return
    main.add_command(getattr(mod, attr), name=attr.replace("_", "-"))


for _module, _attr in (
    ("kubetune_operator.cli", "operator"),
    ("kubetune_trainer.cli", "train"),
    ("kubetune_trainer.cli", "prepare"),
    ("kubetune_trainer.cli", "merge"),
    ("kubetune_trainer.cli", "run"),
):
    _register_optional(_module, _attr)


if __name__ == "__main__":
    main()
