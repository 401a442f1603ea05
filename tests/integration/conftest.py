"""Integration fixtures: the generated CRDs installed into the session's real control plane."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def crds_installed(cluster: Any) -> Any:
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    subprocess.run(["kubectl", "apply", "-f", str(REPO / "crds")], env=env, check=True, capture_output=True)
    subprocess.run(["kubectl", "wait", "--for=condition=Established", "crd/finetunejobs.kubetune.dev",
                    "crd/mergejobs.kubetune.dev", "--timeout=60s"], env=env, check=True, capture_output=True)
    return cluster
