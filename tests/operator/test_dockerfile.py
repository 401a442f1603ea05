"""The Dockerfile: two targets, non-root, installs through hack/install.sh, passes hadolint."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


def _stages() -> dict[str, list[str]]:
    stages: dict[str, list[str]] = {}
    current = None
    for line in DOCKERFILE.read_text().splitlines():
        m = re.match(r"^FROM\s+\S+\s+AS\s+(\S+)", line, re.I)
        if m:
            current = m.group(1)
            stages[current] = []
        elif current and line.strip() and not line.lstrip().startswith("#"):
            stages[current].append(line)
    return stages


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    out = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_two_targets_non_root_install_script():
    stages = _stages()
    assert set(stages) == {"requirements", "operator", "trainer"}  # requirements: the extras' lists
    for name in ("operator", "trainer"):
        lines = stages[name]
        text = "\n".join(lines)
        assert f"bash hack/install.sh {name} deps" in text and f"bash hack/install.sh {name} self" in text
        # the dependencies (torch + CUDA: GBs) install before any source is copied, so a source
        # change rebuilds only the last layers
        deps = next(i for i, ln in enumerate(lines) if f"install.sh {name} deps" in ln)
        sources = min(i for i, ln in enumerate(lines) if re.match(r"COPY (kubetune|operator|trainer) ", ln))
        assert deps < sources, name
        users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
        assert users and users[-1] == "1000:1000", name  # the uid the pod securityContext asks for
        assert not re.search(r"(?i)(AWS_SECRET|API_KEY|TOKEN)\s*=", text), "no secrets in images"
        assert lines[-2].startswith("ENTRYPOINT") and "kubetune" in lines[-2]
    assert '"train", "--spec", "/etc/kubetune/spec.json"' in "\n".join(stages["trainer"])


def test_dockerignore_keeps_the_build_context_small():
    lines = (REPO / ".dockerignore").read_text().splitlines()
    assert lines[lines.index("**")] == "**"  # everything excluded ...
    for needed in ("!pyproject.toml", "!constraints.txt", "!hack/install.sh", "!kubetune/**", "!operator/**",
                   "!trainer/**"):
        assert needed in lines  # ... except the sources the images install
    for path in ("pyproject.toml", "constraints.txt", "hack/install.sh"):
        assert (REPO / path).exists(), path
