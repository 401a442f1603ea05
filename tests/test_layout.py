"""The folder operator/ must never shadow the standard library's `operator` module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECK = "import operator; assert operator.add(1, 2) == 3; assert operator.__file__.endswith('operator.py')"


def test_stdlib_operator_from_repo_root() -> None:
    for flags in ([], ["-S"], ["-I"]):  # also without site (nothing preloaded) and isolated
        subprocess.run([sys.executable, *flags, "-c", CHECK], cwd=REPO, check=True)


def test_stdlib_operator_inside_pytest() -> None:
    import operator

    assert operator.add(1, 2) == 3
    assert Path(operator.__file__).name == "operator.py"
    assert not (REPO / "operator" / "__init__.py").exists()


def test_operator_package_imports_by_its_own_name() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import kubetune_operator, kubetune_trainer, operator; print(operator.add(2, 2))"],
        cwd=REPO, check=True, capture_output=True, text=True,
    )
    assert out.stdout.strip() == "4"


def test_cli_lists_every_entry_point() -> None:
    kubetune = str(Path(sys.executable).parent / "kubetune")
    out = subprocess.run([kubetune, "--help"], check=True, capture_output=True, text=True).stdout
    for command in ("operator", "train", "merge", "run", "crds", "validate"):
        assert f"  {command} " in out, f"`kubetune {command}` missing:\n{out}"
