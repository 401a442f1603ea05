"""Minimal valid manifests the tests start from (tests/ is on sys.path via its conftest)."""

from __future__ import annotations

import copy
from typing import Any


def minimal_ftj() -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "t"},
        "spec": {
            "model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct"},
            "dataset": {"source": "jsonl", "uri": "s3://data/train.jsonl"},
            "training": {"maxSteps": 10},
            "output": {"uri": "s3://out/run-1"},
        },
    }


def minimal_mj() -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "MergeJob",
        "metadata": {"name": "m"},
        "spec": {"source": {"fineTuneJobRef": {"name": "t"}}, "output": {"uri": "s3://out/merged"}},
    }


def with_change(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of doc with spec.<path> set (value None deletes it)."""
    doc = copy.deepcopy(doc)
    node = doc["spec"]
    *parents, last = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    if value is None:
        node.pop(last, None)
    else:
        node[last] = value
    return doc
