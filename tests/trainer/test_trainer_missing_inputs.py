"""Permanent is permanent (issue #18, item 6): a model, dataset or bucket that does not exist, or a
model folder transformers cannot load, is the user's input. ``kubetune train`` exits with a
permanent code at once (InvalidSpec 2, InvalidDataset 3; the pod failure policy fails the Job
without a retry, so no second GPU pod starts). A storage server that is down is a StorageError
(exit 4), retried. Run as the pod runs it, against the real S3 server."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import KUBETUNE, cli_env, qa_rows, spec_doc, write_jsonl

pytestmark = pytest.mark.integration

TEMPLATE = {"format": "template", "template": "Q: {question}\nA: {answer}"}


def train(tmp_path: Path, doc: dict[str, Any], env: dict[str, str]) -> tuple[int, dict[str, Any], str]:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(doc))
    proc = subprocess.run([KUBETUNE, "train", "--spec", str(spec)], capture_output=True, text=True, timeout=300,
                          env=cli_env({**env, "KUBETUNE_WORK_DIR": str(tmp_path / "work"),
                                       "KUBETUNE_TERMINATION_LOG": str(tmp_path / "termination-log")}))
    message = json.loads((tmp_path / "termination-log").read_text())
    return proc.returncode, message, proc.stderr


def data_on_s3(s3: Any, prefix: str, tmp_path: Path) -> str:
    local = write_jsonl(tmp_path / "qa.jsonl", qa_rows(8))
    bucket, _, key = f"{prefix}/qa.jsonl".partition("/")
    s3.client().upload_file(str(local), bucket, key)
    return f"s3://{prefix}/qa.jsonl"


@pytest.mark.parametrize("where", ["folder", "bucket"])
def test_missing_model_is_invalid_spec_at_once(where: str, s3: Any, s3_env: dict[str, str], prefix: str,
                                               tmp_path: Path) -> None:
    uri = f"s3://{prefix}/no-such-model" if where == "folder" else "s3://no-such-bucket-kt/model"
    doc = spec_doc({"uri": uri}, {"source": "jsonl", "uri": data_on_s3(s3, prefix, tmp_path), **TEMPLATE},
                   f"s3://{prefix}/out-{where}", s3.endpoint)
    code, message, stderr = train(tmp_path, doc, s3_env)
    assert code == 2, stderr[-3000:]
    assert message["reason"] == "InvalidSpec" and uri in message["message"], message


def test_missing_dataset_bucket_is_invalid_dataset(tiny_model_dir: Path, s3: Any, s3_env: dict[str, str],
                                                   prefix: str, tmp_path: Path) -> None:
    doc = spec_doc({"name": str(tiny_model_dir)},
                   {"source": "jsonl", "uri": "s3://no-such-bucket-kt/qa.jsonl", **TEMPLATE},
                   f"s3://{prefix}/out", s3.endpoint)
    code, message, stderr = train(tmp_path, doc, s3_env)
    assert code == 3, stderr[-3000:]
    assert message["reason"] == "InvalidDataset" and "s3://no-such-bucket-kt/qa.jsonl" in message["message"]


def test_model_folder_transformers_cannot_load_is_invalid_spec(s3: Any, s3_env: dict[str, str], prefix: str,
                                                               tmp_path: Path) -> None:
    client = s3.client()
    bucket, _, key = prefix.partition("/")
    client.put_object(Bucket=bucket, Key=f"{key}/broken-model/config.json", Body=b"{not json")
    doc = spec_doc({"uri": f"s3://{prefix}/broken-model"},
                   {"source": "jsonl", "uri": data_on_s3(s3, prefix, tmp_path), **TEMPLATE},
                   f"s3://{prefix}/out", s3.endpoint)
    code, message, stderr = train(tmp_path, doc, s3_env)
    assert code == 2, stderr[-3000:]
    assert message["reason"] == "InvalidSpec" and "cannot load the model" in message["message"], message


def test_storage_down_is_a_storage_error_that_is_retried(s3_factory: Any, tmp_path: Path) -> None:
    server = s3_factory()
    server.make_bucket("down")
    endpoint, env = server.endpoint, dict(server.env)
    server.stop()  # the network to storage is gone: transient, a retry may get it
    doc = spec_doc({"uri": "s3://down/model"}, {"source": "jsonl", "uri": "s3://down/qa.jsonl", **TEMPLATE},
                   "s3://down/out", endpoint)
    code, message, stderr = train(tmp_path, doc, env)
    assert code == 4, stderr[-3000:]
    assert message["reason"] == "StorageError" and endpoint in message["message"], message
