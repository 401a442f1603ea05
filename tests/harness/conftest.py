"""Fixtures for the local control-plane harness tests (hack/cluster.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "hack") not in sys.path:
    sys.path.insert(0, str(REPO / "hack"))

import cluster as cluster_mod  # noqa: E402


@pytest.fixture(scope="session")
def local_cluster():
    """One real control plane (etcd + apiserver + kcm + scheduler + kwok) per test session."""
    c = cluster_mod.LocalCluster.start()
    try:
        yield c
    finally:
        c.stop()
