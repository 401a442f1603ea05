"""The CRDs are generated from the models, checked in, and structural (no $ref, no anyOf), with a
description on every field so `kubectl explain` helps."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune import crdgen

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("rel", sorted(crdgen.generated_files()))
def test_checked_in_file_matches_the_models(rel: str) -> None:
    path = REPO / rel
    assert path.exists(), f"{rel} is missing: run `make crds`"
    assert path.read_text() == crdgen.generated_files()[rel], f"{rel} drifted from kubetune/api.py: run `make crds`"


def walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, schema)]
    for name, sub in (schema.get("properties") or {}).items():
        out += walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        out += walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        out += walk(schema["additionalProperties"], f"{path}{{}}")
    return out


@pytest.mark.parametrize("name", sorted(crdgen.crds()))
def test_schema_is_structural_and_documented(name: str) -> None:
    crd = crdgen.crds()[name]
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in walk(schema):
        for banned in ("$ref", "$defs", "anyOf", "oneOf", "allOf", "title", "const"):
            assert banned not in node, f"{name}{path} has {banned}"
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields") \
            or node.get("x-kubernetes-int-or-string"), f"{name}{path} has no type"
        assert not ("type" in node and node.get("x-kubernetes-int-or-string")), f"{name}{path}: int-or-string, typed"
        assert node.get("additionalProperties") is not False, f"{name}{path}: additionalProperties false"
        if path.startswith((".spec.", ".status.")) and not path.endswith("[]") and "{}" not in path:
            assert node.get("description"), f"{name}{path} has no description"


def test_finetunejob_crd_shape() -> None:
    crd = crdgen.crds()["kubetune.dev_finetunejobs.yaml"]
    names, version = crd["spec"]["names"], crd["spec"]["versions"][0]
    assert names["shortNames"] == ["ftj"] and names["categories"] == ["kubetune"]
    assert crd["spec"]["scope"] == "Namespaced" and version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"] if c.get("priority", 0) == 0]
    assert columns == ["Phase", "Model", "Progress", "Loss", "ETA", "Stage", "Age"]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = [r["rule"] for r in spec["x-kubernetes-validations"]]
    assert any("oldSelf.model" in r for r in rules), "spec must be immutable"
    assert not any("oldSelf.suspend" in r for r in rules), "suspend must stay mutable"
    assert spec["properties"]["lora"]["properties"]["r"]["minimum"] == 0
    assert spec["properties"]["lora"]["properties"]["r"]["exclusiveMinimum"] is True
    assert spec["properties"]["output"]["properties"]["uri"]["pattern"].startswith("^s3://")
    assert spec["properties"]["quantization"]["default"] == {}


def test_mergejob_crd_shape() -> None:
    crd = crdgen.crds()["kubetune.dev_mergejobs.yaml"]
    version = crd["spec"]["versions"][0]
    assert crd["spec"]["names"]["shortNames"] == ["mj"]
    columns = [c["name"] for c in version["additionalPrinterColumns"] if c.get("priority", 0) == 0]
    assert columns == ["Phase", "Source", "Output", "Age"]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["properties"]["resources"]["default"] == {"gpus": 0}
    assert any("oldSelf.dtype" in r["rule"] for r in spec["x-kubernetes-validations"])


def test_cli_prints_the_same_crds() -> None:
    out = subprocess.run([sys.executable, "-m", "kubetune.cli", "crds"], capture_output=True, text=True, check=True)
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert [d["metadata"]["name"] for d in docs] == ["finetunejobs.kubetune.dev", "mergejobs.kubetune.dev"]
