"""Every validation rule of the API models, both ways: a valid manifest passes, a bad one fails
with a message that names the problem. The same rules are enforced by the CRD schema (see
tests/integration/test_crds_apiserver.py, against a real kube-apiserver)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from manifests import METHOD_CASES, METHOD_OK, minimal_ftj, minimal_mj, with_change, with_changes
from pydantic import ValidationError

from kubetune import api

REPO = Path(__file__).resolve().parents[1]


def test_minimal_manifest_gets_the_qlora_defaults() -> None:
    job = api.parse_manifest(minimal_ftj())
    assert isinstance(job, api.FineTuneJob)
    spec = job.spec
    assert (spec.quantization.bits, spec.quantization.type, spec.quantization.double_quant) == (4, "nf4", True)
    assert spec.quantization.compute_dtype == "bfloat16"
    assert (spec.lora.r, spec.lora.alpha, spec.lora.dropout, spec.lora.bias) == (16, 32, 0.05, "none")
    assert spec.lora.target_modules == ["all-linear"]
    assert spec.training.packing == "bfd"
    assert spec.resources.gpus == 1 and spec.resources.gpu_resource == "nvidia.com/gpu"
    assert spec.suspend is False


def test_wire_format_is_camel_case_and_round_trips() -> None:
    job = api.parse_manifest(minimal_ftj())
    wire = job.spec.to_wire()
    assert wire["lora"]["targetModules"] == ["all-linear"]
    assert wire["training"]["gradientAccumulationSteps"] == 1
    assert "target_modules" not in str(wire)
    assert api.FineTuneJobSpec.model_validate(wire) == job.spec


def test_merge_job_defaults_to_cpu() -> None:
    job = api.parse_manifest(minimal_mj())
    assert isinstance(job, api.MergeJob)
    assert job.spec.resources.gpus == 0 and job.spec.dtype == "bfloat16"


@pytest.mark.parametrize(
    "path,value",
    [
        ("model", {"uri": "s3://models/llama"}),
        ("model", {"name": "org/model", "revision": "v1", "secretRef": {"name": "hf"}}),
        ("quantization", {"bits": 16}),
        ("quantization", {"bits": 8, "computeDtype": "float16"}),
        ("lora", {"r": 64, "alpha": 16, "targetModules": ["q_proj", "v_proj"], "useRslora": True}),
        ("dataset", {"source": "deeplake", "uri": "hub://org/ds", "format": "messages"}),
        ("dataset", {"source": "parquet", "uri": "/data/x.parquet", "eval": {"fraction": 0.1}}),
        ("dataset", {"source": "huggingface", "uri": "s3://d/x", "eval": {"split": "test"}}),
        ("dataset", {"source": "jsonl", "uri": "x.jsonl", "format": "template", "template": "Q: {q}\nA: {a}"}),
        ("training", {"epochs": 1.5}),
        ("training", {"maxSteps": 5, "packing": "wrapped", "optimizer": "paged_adamw_8bit"}),
        ("storage", {"endpoint": "http://minio.storage:9000", "secretRef": {"name": "s3"}}),
        ("tracking", {"wandb": {"project": "p", "mode": "offline"}}),
        ("tracking", {"wandb": {"project": "p", "secretRef": {"name": "w", "key": "WANDB_API_KEY"}}}),
        ("resources", {"gpus": 0, "cpu": "500m", "memory": "8Gi", "tolerations": [{"operator": "Exists"}]}),
        ("merge", {"enabled": True, "output": {"uri": "s3://out/merged"}}),
        ("queueName", "team-a"),
    ],
)
def test_valid_variants_pass(path: str, value: Any) -> None:
    api.parse_manifest(with_change(minimal_ftj(), path, value))


@pytest.mark.parametrize(
    "path,value,message",
    [
        ("model", {"name": "a/b", "uri": "s3://models/x"}, "exactly one of name and uri, not both"),
        ("model", {"revision": "main"}, "exactly one of name and uri"),
        ("model", {"uri": "https://example.com/model"}, "should match pattern"),
        ("quantization", {"bits": 3}, "Input should be 'auto', 4, 8 or 16"),
        ("quantization", {"type": "int4"}, "'nf4' or 'fp4'"),
        ("quantization", {"computeDtype": "float64"}, "'bfloat16', 'float16' or 'float32'"),
        ("lora", {"r": 0}, "greater than 0"),
        ("lora", {"r": -4}, "greater than 0"),
        ("lora", {"dropout": 1.0}, "less than 1"),
        ("lora", {"bias": "some"}, "'none', 'all' or 'lora_only'"),
        ("lora", {"targetModules": []}, "at least 1 item"),
        ("dataset", {"source": "csv", "uri": "x"}, "'deeplake', 'huggingface', 'jsonl' or 'parquet'"),
        ("dataset", {"source": "jsonl", "uri": ""}, "at least 1 character"),
        ("dataset", {"source": "jsonl", "uri": "x", "format": "template"}, "dataset.template is required"),
        ("dataset", {"source": "jsonl", "uri": "x", "eval": {"split": "t", "fraction": 0.1}}, "not both"),
        ("dataset", {"source": "jsonl", "uri": "x", "eval": {}}, "exactly one of split and fraction"),
        ("dataset", {"source": "jsonl", "uri": "x", "eval": {"fraction": 1.5}}, "less than 1"),
        ("training", {}, "exactly one of maxSteps and epochs"),
        ("training", {"maxSteps": 10, "epochs": 1}, "not both"),
        ("training", {"maxSteps": 0}, "greater than 0"),
        ("training", {"maxSteps": 1, "packing": "greedy"}, "'none', 'bfd', 'bfd_split' or 'wrapped'"),
        ("training", {"maxSteps": 1, "learningRate": 0}, "greater than 0"),
        ("output", {"uri": "/local/path"}, "should match pattern"),
        ("output", {"uri": "gs://bucket/x"}, "should match pattern"),
        ("output", {"uri": "s3://AKIA:secret@bucket/x"}, "should match pattern"),
        ("storage", {"accessKeyId": "AKIA...", "secretAccessKey": "x"}, "Extra inputs are not permitted"),
        ("storage", {"endpoint": "http://user:pass@minio:9000"}, "should match pattern"),
        ("tracking", {"wandb": {"project": "p", "apiKey": "xyz"}}, "Extra inputs are not permitted"),
        ("tracking", {"wandb": {"project": "p"}}, "secretRef (the API key) is required"),
        ("resources", {"gpus": -1}, "greater than or equal to 0"),
        ("resources", {"memory": "lots"}, "should match pattern"),
        ("backoffLimit", -1, "greater than or equal to 0"),
        ("queueName", "Team_A", "should match pattern"),
        ("unknownField", 1, "Extra inputs are not permitted"),
        ("training", {"maxSteps": 5, "earlyStopping": {"patience": 2}},
         "training.earlyStopping and training.keepBest need evaluation data: set dataset.eval"),
        ("training", {"maxSteps": 5, "keepBest": True}, "need evaluation data"),
        ("training", {"maxSteps": 5, "earlyStopping": {"patience": 0}}, "greater than or equal to 1"),
        ("training", {"maxSteps": 5, "watchdog": {"stallSeconds": 1}}, "greater than or equal to 5"),
        ("training", {"maxSteps": 5, "watchdog": {"divergenceFactor": 1}}, "greater than 1"),
        ("dataset", {"source": "jsonl", "uri": "x", "eval": {"fraction": 0.1, "maxSamples": 0}},
         "greater than or equal to 1"),
    ],
)
def test_invalid_variants_fail_with_a_clear_message(path: str, value: Any, message: str) -> None:
    with pytest.raises(ValidationError) as err:
        api.parse_manifest(with_change(minimal_ftj(), path, value))
    assert message in str(err.value)


@pytest.mark.parametrize(
    "source,message",
    [
        ({"fineTuneJobRef": {"name": "t"}, "adapterUri": "s3://adapters/b"}, "not both"),
        ({}, "exactly one of fineTuneJobRef and adapterUri"),
        ({"adapterUri": "file:///x"}, "should match pattern"),
    ],
)
def test_merge_source_rules(source: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as err:
        api.parse_manifest(with_change(minimal_mj(), "source", source))
    assert message in str(err.value)


def test_merge_source_adapter_uri_with_base_passes() -> None:
    doc = with_change(minimal_mj(), "source", {"adapterUri": "s3://adapters/x", "baseModel": {"uri": "s3://models/b"}})
    assert api.parse_manifest(doc).spec.source.adapter_uri == "s3://adapters/x"


def test_parse_manifest_rejects_other_kinds_and_versions() -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        api.parse_manifest({**minimal_ftj(), "kind": "Job"})
    with pytest.raises(ValueError, match="apiVersion must be kubetune.dev/v1alpha1"):
        api.parse_manifest({**minimal_ftj(), "apiVersion": "kubetune.dev/v1"})


@pytest.mark.parametrize("path", sorted(p.relative_to(REPO).as_posix() for p in (REPO / "examples").glob("*.yaml")))
def test_every_shipped_example_is_valid(path: str) -> None:
    docs = [d for d in yaml.safe_load_all((REPO / path).read_text()) if d and d.get("apiVersion") == api.API_VERSION]
    assert docs, f"{path} holds no kubetune resource"
    for doc in docs:
        api.parse_manifest(doc)


def test_classic_recipe_example_matches_the_issue() -> None:
    doc = yaml.safe_load((REPO / "examples/finetune.yaml").read_text())
    spec = api.parse_manifest(doc).spec
    assert isinstance(spec, api.FineTuneJobSpec)
    assert (spec.lora.r, spec.lora.alpha, spec.lora.dropout, spec.lora.bias) == (16, 32, 0.05, "none")
    assert spec.dataset.format == "template" and spec.training.packing != "none" and spec.training.bf16
    assert spec.tracking and spec.tracking.wandb


@pytest.mark.parametrize("changes, message", METHOD_CASES)
def test_methods_need_their_data(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as err:
        api.parse_manifest(with_changes(minimal_ftj(), changes))
    assert message in str(err.value)


@pytest.mark.parametrize("changes", METHOD_OK)
def test_methods_with_their_data_are_accepted(changes: dict[str, Any]) -> None:
    api.parse_manifest(with_changes(minimal_ftj(), changes))
