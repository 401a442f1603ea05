"""``kubetune merge --spec FILE`` as the pod runs it: a subprocess, credentials in the environment,
the result in the termination message file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from merge_helpers import BUCKET, Adapter, assert_matches_base_plus_adapter, assert_published, publish_adapter

from kubetune import contract

pytestmark = pytest.mark.integration
KUBETUNE = str(Path(sys.executable).with_name("kubetune"))


def run_cli(s3: Any, spec: dict[str, Any], tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    termination = tmp_path / "termination-log"
    env = {**os.environ, **s3.env, contract.ENV_TERMINATION_LOG: str(termination),
           contract.ENV_WORK_DIR: str(tmp_path / "work"), contract.ENV_KIND: "MergeJob"}
    proc = subprocess.run([KUBETUNE, "merge", "--spec", str(spec_file)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert termination.is_file(), proc.stderr[-3000:]
    assert len(termination.read_bytes()) <= contract.TERMINATION_MESSAGE_LIMIT
    return proc, json.loads(termination.read_text())


def test_cli_merges_float32_and_reports_through_the_termination_message(
    s3: Any, tiny_adapter: Adapter, out_uri: str, tmp_path: Path, download: Any, fresh_logits: Any,
) -> None:
    spec = {"source": {"adapterUri": tiny_adapter.uri}, "dtype": "float32", "output": {"uri": out_uri},
            "storage": {"endpoint": s3.endpoint},
            "verify": {"prompts": ["Say hi.", "Name a colour."], "maxNewTokens": 4}}
    proc, message = run_cli(s3, spec, tmp_path)

    assert proc.returncode == contract.EXIT_OK, proc.stderr[-3000:]
    assert message["reason"] == "Completed"
    result = message["result"]
    assert result["mergedUri"] == out_uri and result["adapterUri"] == tiny_adapter.uri
    assert result["verification"]["passed"] is True
    assert [s["prompt"] for s in result["samples"]] == ["Say hi.", "Name a colour."]
    local = download(out_uri)
    manifest = assert_published(s3, out_uri, local, result)
    assert manifest["dtype"] == "float32" and manifest["baseModel"]["uri"] == tiny_adapter.base_uri
    assert manifest["verification"] == result["verification"]
    assert manifest["peakRssMiB"] > 0 and manifest["timings"]["total"] > 0
    assert_matches_base_plus_adapter(fresh_logits(local, "float32"), tiny_adapter, "float32", result)


def test_cli_exit_code_and_reason_for_an_incomplete_adapter(
    s3: Any, tiny_adapter: Adapter, out_uri: str, tmp_path: Path,
) -> None:
    uri = publish_adapter(s3, tiny_adapter.local, f"s3://{BUCKET}/runs/cli-unfinished/adapter",
                          {"uri": tiny_adapter.base_uri}, manifest=False)
    manifest = {"apiVersion": "kubetune.dev/v1alpha1", "kind": "MergeJob", "metadata": {"name": "m"},
                "spec": {"source": {"adapterUri": uri}, "output": {"uri": out_uri},
                         "storage": {"endpoint": s3.endpoint}}}
    proc, message = run_cli(s3, manifest, tmp_path)

    assert proc.returncode == contract.EXIT_INVALID_ADAPTER
    assert message["reason"] == "InvalidAdapter"
    assert "cli-unfinished/adapter/manifest.json is missing" in message["message"]
