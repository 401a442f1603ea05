"""Integration fixtures: the generated CRDs installed into the session's real control plane."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def crds_installed(cluster: Any) -> Any:
    cluster.install_crds(REPO / "crds")
    return cluster
