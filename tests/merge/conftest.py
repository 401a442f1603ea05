"""Fixtures for the merge tests: bases and adapters in the session S3 server, specs, a pod context."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from merge_helpers import BUCKET, Adapter, build_adapter, fresh_process_logits, publish_adapter, slug, store_for

# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def bucket(s3: Any) -> str:
    return s3.make_bucket(BUCKET)


@pytest.fixture(scope="session")
def tiny_base_uri(s3: Any, bucket: str, tiny_model_dir: Path) -> str:
    return s3.upload_dir(tiny_model_dir, BUCKET, "bases/tiny")


@pytest.fixture(scope="session")
def tied_base_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A tiny Llama whose lm_head shares the input embedding's weight (tie_word_embeddings=True)."""
    import localenv  # hack/, on sys.path through tests/conftest.py

    return localenv.tiny_model_dir(tmp_path_factory.mktemp("tiny-tied"), tie_word_embeddings=True, seed=1)


@pytest.fixture(scope="session")
def tied_base_uri(s3: Any, bucket: str, tied_base_dir: Path) -> str:
    return s3.upload_dir(tied_base_dir, BUCKET, "bases/tiny-tied")


@pytest.fixture(scope="session")
def tiny_adapter(s3: Any, tiny_base_uri: str, tiny_model_dir: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Adapter:
    """all-linear LoRA (r=8) on the tiny base, published with its manifest."""
    local = build_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter-tiny") / "adapter")
    uri = publish_adapter(s3, local, f"s3://{BUCKET}/runs/tiny/adapter", {"uri": tiny_base_uri})
    return Adapter(uri, local, tiny_model_dir, tiny_base_uri)


@pytest.fixture
def out_uri(request: pytest.FixtureRequest) -> str:
    return f"s3://{BUCKET}/merged/{slug(request.node.name)}"


@pytest.fixture
def merge_spec(s3: Any) -> Callable[..., Any]:
    """Build a validated MergeJobSpec against the session S3 server."""
    from kubetune import api

    def make(adapter_uri: str, output_uri: str, dtype: str = "float32", **extra: Any) -> api.MergeJobSpec:
        doc = {"source": {"adapterUri": adapter_uri}, "dtype": dtype, "output": {"uri": output_uri},
               "storage": {"endpoint": s3.endpoint},
               "verify": {"prompts": ["What is a Kubernetes Job?"], "maxNewTokens": 6}}
        for key, value in extra.items():
            doc[key] = {**doc[key], **value} if isinstance(doc.get(key), dict) else value
        return api.MergeJobSpec.model_validate(doc)

    return make


@pytest.fixture
def pod(tmp_path: Path) -> Any:
    """A PodContext as in a pod without a cluster: no status channel, a local termination log."""
    from kubetune_trainer.runtime import PodContext, StatusReporter

    work = tmp_path / "work"
    work.mkdir()
    return PodContext(kind="MergeJob", name="m", namespace="ns", work_dir=work,
                      reporter=StatusReporter(None, None, None, None, None, None),
                      termination_log=tmp_path / "termination-log")


@pytest.fixture
def download(s3: Any, tmp_path: Path) -> Callable[[str], Path]:
    """Download an s3:// folder from the session server into a fresh local folder."""
    counter = iter(range(1000))

    def fetch(uri: str) -> Path:
        dest = tmp_path / f"download-{next(counter)}"
        store_for(s3).download_dir(uri, dest)
        return dest

    return fetch


@pytest.fixture
def fresh_logits(tmp_path: Path) -> Iterator[Callable[[Path, str], list[Any]]]:
    counter = iter(range(1000))
    yield lambda model_dir, dtype: fresh_process_logits(model_dir, dtype, tmp_path / f"logits-{next(counter)}.pt")
