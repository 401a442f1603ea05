"""The container runtime: spec loading, exit codes, termination messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from kubetune_trainer import runtime
from manifests import minimal_ftj

from kubetune import api, contract


def test_load_spec_accepts_a_manifest_or_a_bare_spec_in_yaml_or_json(tmp_path: Path) -> None:
    manifest = minimal_ftj()
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(manifest))
    (tmp_path / "s.json").write_text(json.dumps(manifest["spec"]))
    a = runtime.load_spec(str(tmp_path / "m.yaml"), api.FineTuneJobSpec)
    b = runtime.load_spec(str(tmp_path / "s.json"), api.FineTuneJobSpec)
    assert a == b and a.training.max_steps == 10


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "cannot read the spec"),
        ("[1, 2]", "must be a mapping"),
        ("model: [unclosed", "not valid YAML/JSON"),
        (json.dumps({"model": {"name": "x"}}), "invalid FineTuneJobSpec"),
    ],
)
def test_load_spec_errors_are_invalid_spec(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "spec.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(runtime.InvalidSpec, match=message) as err:
        runtime.load_spec(str(path), api.FineTuneJobSpec)
    assert err.value.exit_code == contract.EXIT_INVALID_SPEC


def context(tmp_path: Path) -> runtime.PodContext:
    return runtime.PodContext.from_env("FineTuneJob", env={
        contract.ENV_WORK_DIR: str(tmp_path / "work"),
        contract.ENV_TERMINATION_LOG: str(tmp_path / "termination-log"),
        contract.ENV_SA_DIR: str(tmp_path / "no-sa"),
    })


@pytest.mark.parametrize(
    "error,code,reason",
    [
        (runtime.InvalidDataset("column 'text' is missing"), 3, "InvalidDataset"),
        (runtime.StorageError("cannot upload"), 4, "StorageError"),
        (runtime.InvalidAdapter("no manifest"), 5, "InvalidAdapter"),
        (runtime.VerificationFailed("diff 3.0"), 6, "VerificationFailed"),
        (runtime.Preempted("SIGTERM at step 7"), 7, "Preempted"),
        (ZeroDivisionError("division by zero"), 1, "Crashed"),
    ],
)
def test_run_entry_maps_failures_to_exit_codes_and_termination_messages(
        tmp_path: Path, error: Exception, code: int, reason: str) -> None:
    def recipe(ctx: runtime.PodContext) -> dict:  # type: ignore[type-arg]
        raise error

    ctx = context(tmp_path)
    assert not ctx.reporter.enabled
    assert runtime.run_entry("FineTuneJob", recipe, ctx) == code
    message = json.loads((tmp_path / "termination-log").read_text())
    assert message["reason"] == reason and str(error) in message["message"]


def test_run_entry_success_writes_the_result(tmp_path: Path) -> None:
    ctx = context(tmp_path)
    result = {"adapterUri": "s3://out/run/adapter", "progress": {"step": 20, "percent": 100}}
    assert runtime.run_entry("FineTuneJob", lambda _: result, ctx) == 0
    message = json.loads((tmp_path / "termination-log").read_text())
    assert message["reason"] == "Completed" and message["result"] == result


def test_termination_message_always_fits(tmp_path: Path) -> None:
    path = tmp_path / "t"
    samples = [{"prompt": "p" * 500, "output": "o" * 2000} for _ in range(8)]
    runtime.write_termination_message(path, "Completed", "done", {"mergedUri": "s3://x/y", "samples": samples})
    doc = json.loads(path.read_text())
    assert len(path.read_bytes()) <= contract.TERMINATION_MESSAGE_LIMIT
    assert doc["result"]["mergedUri"] == "s3://x/y" and len(doc["result"]["samples"]) == 8
    runtime.write_termination_message(path, "Crashed", "x" * 10000, {})
    assert len(path.read_bytes()) <= contract.TERMINATION_MESSAGE_LIMIT
