"""Fixtures for the trainer tests: a bucket in the session S3 server, a store, a tokenizer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import BUCKET, make_pod, qa_rows, slug, write_jsonl


@pytest.fixture(scope="session")
def bucket(s3: Any) -> str:
    return s3.make_bucket(BUCKET)


@pytest.fixture
def prefix(request: pytest.FixtureRequest, bucket: str) -> str:
    """A fresh s3:// folder for this test."""
    return f"{BUCKET}/{slug(request.node.name)}"


@pytest.fixture
def store(s3: Any, s3_env: dict[str, str]) -> Any:
    from kubetune_trainer.storage import Store

    from kubetune import api

    return Store.from_spec(api.Storage(endpoint=s3.endpoint))


@pytest.fixture
def pod(tmp_path: Path) -> Any:
    return make_pod(tmp_path / "work")


@pytest.fixture
def qa_jsonl(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "qa.jsonl", qa_rows())


@pytest.fixture
def dataset_spec() -> Callable[..., Any]:
    from kubetune import api

    def make(**fields: Any) -> api.Dataset:
        return api.Dataset.model_validate(fields)

    return make


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture
def tokenizer_only_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's folder WITHOUT weights or config: loading a model from it fails, so a test
    that passes with it proves no model was loaded."""
    import shutil

    from kubetune_trainer.modeling import is_tokenizer_file

    dest = tmp_path_factory.mktemp("tokenizer-only")
    for path in tiny_model_dir.iterdir():
        if is_tokenizer_file(path.name) and path.name not in ("config.json", "generation_config.json"):
            shutil.copy(path, dest / path.name)
    return dest
