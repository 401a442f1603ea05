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
    if "enum" in node and "type" not in node and not node.get("x-kubernetes-int-or-string"):
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


FINAL_PHASE = {
    "rule": "!has(oldSelf.phase) || !(oldSelf.phase in ['Succeeded', 'Failed']) || "
            "(has(self.phase) && self.phase == oldSelf.phase)",
    "message": "status.phase is final once Succeeded or Failed",
    "reason": "FieldValueForbidden",
}
"""A finished run stays finished, whoever writes: a lagging ex-leader, a stale cache or a pod."""


def _crd(kind: str, plural: str, short: str, spec_model: type[BaseModel], status_model: type[BaseModel],
         columns: list[dict[str, Any]], mutable: set[str], doc: str) -> dict[str, Any]:
    spec = structural(spec_model)
    spec.setdefault("x-kubernetes-validations", []).append(_immutable_except(spec, mutable))
    status = structural(status_model)
    status.setdefault("x-kubernetes-validations", []).append(FINAL_PHASE)
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
            {"name": "Model", "type": "string", "jsonPath": ".status.model"},
            {"name": "Progress", "type": "integer", "jsonPath": ".status.progress.percent",
             "description": "Percent of training steps done"},
            {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
            {"name": "ETA", "type": "string", "jsonPath": ".status.progress.eta"},
            {"name": "Stage", "type": "string", "jsonPath": ".status.stage",
             "description": "What the pod does now (preparing: ... on CPU, then loading, training, uploading)"},
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


def _rows(schema: dict[str, Any], path: str, required: bool) -> list[str]:
    kind = "integer or string" if schema.get("x-kubernetes-int-or-string") else schema.get("type", "object")
    if kind == "array" and isinstance(schema.get("items"), dict):
        kind = f"[]{schema['items'].get('type', 'object')}"
    facts = []
    if "enum" in schema:
        facts.append("one of " + ", ".join(f"`{v}`" for v in schema["enum"]))
    if "default" in schema and schema["default"] != {}:
        facts.append(f"default `{schema['default']}`")
    for key, (loose, strict) in (("minimum", ("≥", ">")), ("maximum", ("≤", "<"))):
        if key in schema:
            is_strict = schema.get("exclusive" + key[0].upper() + key[1:]) is True
            facts.append(f"{strict if is_strict else loose} {schema[key]}")
    if "pattern" in schema:
        facts.append(f"pattern `{schema['pattern']}`")
    for rule in schema.get("x-kubernetes-validations", []):
        if "oldSelf" not in rule["rule"]:
            facts.append(rule["message"])
    desc = " ".join(schema.get("description", "").split()).replace("|", "\\|")
    extra = ("; ".join(facts)).replace("|", "\\|")
    rows = [f"| `{path}` | {kind} | {'yes' if required else ''} | {desc}{' — ' + extra if extra else ''} |"]
    props = schema.get("properties") or (schema.get("items") or {}).get("properties") or {}
    req = set(schema.get("required") or (schema.get("items") or {}).get("required") or [])
    for name, sub in props.items():
        rows.extend(_rows(sub, f"{path}.{name}", name in req))
    return rows


def api_docs() -> str:
    """docs/api.md: one table per kind, every field with its type, default, bounds and description."""
    out = [
        "# kubetune API reference (kubetune.dev/v1alpha1)",
        "",
        "Generated by `make crds` from `kubetune/api.py`; do not edit. `kubectl explain finetunejob.spec` "
        "shows the same descriptions. The spec cannot change after creation, except `spec.suspend` "
        "on a FineTuneJob.",
        "",
    ]
    for doc in crds().values():
        names = doc["spec"]["names"]
        schema = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        out += [f"## {names['kind']} (short name `{names['shortNames'][0]}`)", "", schema["description"], ""]
        for part in ("spec", "status"):
            out += [f"### {part}", "", "| field | type | required | description |", "|---|---|---|---|"]
            sub = schema["properties"][part]
            for name, prop in sub["properties"].items():
                out += _rows(prop, f"{part}.{name}", name in set(sub.get("required", [])))
            out.append("")
    return "\n".join(out)


CRD_DIRS = ("crds", "charts/kubetune/crds")


def generated_files() -> dict[str, str]:
    """Every checked-in file generated from the API: repo-relative path -> content."""
    files = {f"{d}/{name}": text for d in CRD_DIRS for name, text in render().items()}
    files["docs/api.md"] = api_docs()
    return files


def write_generated(repo: Path) -> list[Path]:
    """``make crds``: regenerate crds/, the chart's CRDs and docs/api.md."""
    written = []
    for rel, text in generated_files().items():
        path = repo / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written
