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


PREFERENCE = {"source": "jsonl", "uri": "s3://data/pairs.jsonl", "format": "preference"}
FEEDBACK = {"source": "jsonl", "uri": "s3://data/feedback.jsonl", "format": "feedback"}

# Methods and their data, refused the same way by the API models and by the CRDs' rules at
# admission: (changes to minimal_ftj's spec, the message).
PREFERENCE_NEEDS_A_METHOD = "dataset.format preference and feedback are preference data: set method dpo, orpo or kto"
METHOD_CASES: list[tuple[dict[str, Any], str]] = [
    ({"method": "dpo"}, "method dpo trains on dataset.format preference (prompt, chosen, rejected)"),
    ({"method": "dpo", "dataset": FEEDBACK}, "method dpo trains on dataset.format preference"),
    ({"method": "orpo"}, "method orpo trains on dataset.format preference (prompt, chosen, rejected)"),
    ({"method": "orpo", "dataset": FEEDBACK}, "method orpo trains on dataset.format preference"),
    ({"method": "dpo", "dataset": PREFERENCE, "orpo": {"beta": 0.2}},
     "spec.orpo configures method orpo: set method: orpo, or remove spec.orpo"),
    ({"method": "orpo", "dataset": PREFERENCE, "orpo": {"beta": 0}}, "greater than 0"),
    ({"method": "kto"}, "method kto trains on dataset.format feedback (prompt, completion, label) or preference"),
    ({"dataset": PREFERENCE}, PREFERENCE_NEEDS_A_METHOD),
    ({"dataset": FEEDBACK}, PREFERENCE_NEEDS_A_METHOD),
    ({"dpo": {"beta": 0.2}}, "spec.dpo configures method dpo: set method: dpo, or remove spec.dpo"),
    ({"method": "dpo", "dataset": PREFERENCE, "kto": {}}, "spec.kto configures method kto"),
    ({"method": "dpo", "dataset": PREFERENCE, "dpo": {"labelSmoothing": 0.5}}, "dpo.labelSmoothing must be below 0.5"),
    ({"method": "kto", "dataset": FEEDBACK, "training": {"maxSteps": 10, "batchSize": 1}},
     "method kto estimates its KL term from the other completions of a batch: set training.batchSize to 2 or more"),
    ({"method": "dpo", "dataset": PREFERENCE, "model": {"name": "m", "adapterFrom": {}}},
     "model.adapterFrom: set exactly one of fineTuneJobRef and uri"),
]

# ...and accepted by both.
METHOD_OK: list[dict[str, Any]] = [
    {"method": "dpo", "dataset": PREFERENCE, "dpo": {"beta": 0.5, "lossType": "ipo"}},
    {"method": "kto", "dataset": FEEDBACK, "kto": {"desirableWeight": 1.33}},
    {"method": "orpo", "dataset": PREFERENCE, "orpo": {"beta": 0.25, "maxPromptLength": 8}},
    {"method": "kto", "dataset": PREFERENCE, "training": {"maxSteps": 10, "batchSize": 1},
     "kto": {"lossType": "apo_zero_unpaired"}},
    {"method": "dpo", "dataset": PREFERENCE,
     "model": {"name": "m", "adapterFrom": {"fineTuneJobRef": {"name": "sft"}}}},
]


def with_changes(doc: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    for path, value in changes.items():
        doc = with_change(doc, path, value)
    return doc
