"""Generate the CustomResourceDefinitions from the pydantic models in :mod:`kubetune.api`.

Pydantic emits JSON Schema (draft 2020-12, with ``$ref``/``$defs`` and ``anyOf`` for optionals);
Kubernetes wants a structural OpenAPI v3 schema: every ``$ref`` inlined, no ``anyOf`` of types,
``exclusiveMinimum`` as a boolean, no ``title``/``const``. :func:`structural` does that
conversion; :func:`crds` assembles the two CRDs; ``kubetune crds --out crds/`` writes them.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from kubetune import api

CATEGORY = "kubetune"

_DROP = {"title", "discriminator"}


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_resolve(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _resolve(merged, defs)
    return {k: _resolve(v, defs) for k, v in node.items() if k != "$defs"}


def _convert(node: Any) -> Any:
    """Rewrite one resolved JSON-Schema node into Kubernetes' structural OpenAPI v3 dialect."""
    if isinstance(node, list):
        return [_convert(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    # Optional[X] -> X (absence means unset); keep the outer description/default.
    if "anyOf" in node:
        variants = [v for v in node.pop("anyOf") if v.get("type") != "null"]
        if len(variants) != 1:
            raise ValueError(f"cannot express anyOf {variants} structurally")
        inner = dict(variants[0])
        inner.update({k: v for k, v in node.items() if k in ("description", "default")})
        inner.update({k: v for k, v in node.items() if k.startswith("x-kubernetes")})
        node = inner
        if node.get("default", 0) is None:
            del node["default"]
    for key in _DROP:
        node.pop(key, None)
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if "enum" in node and "type" not in node:
        node["type"] = "integer" if all(isinstance(v, int) for v in node["enum"]) else "string"
    for bound, base in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if bound in node and not isinstance(node[bound], bool):
            node[base] = node.pop(bound)
            node[bound] = True
    if node.get("additionalProperties") is False:
        node.pop("additionalProperties")  # structural schemas prune unknown fields instead
    if node.get("x-kubernetes-preserve-unknown-fields"):
        node.pop("additionalProperties", None)
        node["type"] = "object"
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: _convert(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _convert(value)
        else:
            out[key] = value
    return out


def structural(model: type[BaseModel]) -> dict[str, Any]:
    """Structural OpenAPI v3 schema of a model, camelCase property names."""
    schema = model.model_json_schema(by_alias=True, mode="validation")
    defs = schema.get("$defs", {})
    return _convert(_resolve(schema, defs))


def _immutable_except(spec_schema: dict[str, Any], mutable: set[str]) -> dict[str, str]:
    """A CEL transition rule: no spec field but the mutable ones may change after creation."""
    parts = []
    for name in sorted(spec_schema["properties"]):
        if name in mutable:
            continue
        parts.append(
            f"(has(self.{name}) == has(oldSelf.{name}) && (!has(self.{name}) || self.{name} == oldSelf.{name}))"
        )
    allowed = ", ".join(f"spec.{m}" for m in sorted(mutable)) or "nothing"
    return {
        "rule": " && ".join(parts),
        "message": f"spec is immutable after creation (only {allowed} may change); "
        "delete and re-create the resource to change it",
        "reason": "FieldValueForbidden",
    }


def _crd(kind: str, plural: str, short: str, spec_model: type[BaseModel], status_model: type[BaseModel],
         columns: list[dict[str, Any]], mutable: set[str], doc: str) -> dict[str, Any]:
    spec = structural(spec_model)
    spec.setdefault("x-kubernetes-validations", []).append(_immutable_except(spec, mutable))
    status = structural(status_model)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{api.GROUP}",
            "labels": {"app.kubernetes.io/name": "kubetune", "app.kubernetes.io/part-of": "kubetune"},
        },
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short],
                "categories": [CATEGORY],
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": doc,
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string", "description": "API version: kubetune.dev/v1alpha1."},
                                "kind": {"type": "string", "description": f"Kind: {kind}."},
                                "metadata": {"type": "object"},
                                "spec": spec,
                                "status": status,
                            },
                        }
                    },
                }
            ],
        },
    }


def _age() -> dict[str, Any]:
    return {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


def crds() -> dict[str, dict[str, Any]]:
    """file name -> CRD document."""
    finetune = _crd(
        "FineTuneJob", "finetunejobs", "ftj", api.FineTuneJobSpec, api.FineTuneJobStatus,
        [
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Model", "type": "string", "jsonPath": ".spec.model.name"},
            {"name": "Progress", "type": "integer", "jsonPath": ".status.progress.percent",
             "description": "Percent of training steps done"},
            {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
            {"name": "ETA", "type": "string", "jsonPath": ".status.progress.eta"},
            _age(),
            {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1},
        ],
        {"suspend"},
        "FineTuneJob runs packed QLoRA supervised fine-tuning of a base model on a dataset and "
        "publishes the LoRA adapter to object storage.",
    )
    merge = _crd(
        "MergeJob", "mergejobs", "mj", api.MergeJobSpec, api.MergeJobStatus,
        [
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Source", "type": "string", "jsonPath": ".spec.source.fineTuneJobRef.name"},
            {"name": "Output", "type": "string", "jsonPath": ".spec.output.uri"},
            _age(),
            {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1},
        ],
        set(),
        "MergeJob merges a LoRA adapter into its base model (merge-and-unload), verifies the result "
        "and publishes a standalone model to object storage.",
    )
    return {"kubetune.dev_finetunejobs.yaml": finetune, "kubetune.dev_mergejobs.yaml": merge}


HEADER = "# Generated by `kubetune crds --out crds/` from kubetune/api.py. Do not edit.\n"


def render() -> dict[str, str]:
    """file name -> YAML text."""
    return {
        name: HEADER + yaml.safe_dump(doc, sort_keys=False, width=100, allow_unicode=True)
        for name, doc in crds().items()
    }


def write(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render().items():
        path = out_dir / name
        path.write_text(text)
        written.append(path)
    return written
