"""Job and pod dicts as the API server, scheduler and kubelet report them (for unit tests)."""

from __future__ import annotations

import copy
import json
from typing import Any

T0 = "2026-01-01T00:00:00Z"


def job_dict(name: str = "demo-train", conditions: list[dict[str, Any]] | None = None, suspend: bool = False,
             **status: Any) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": "team-a", "uid": "job-uid",
                     "ownerReferences": [{"uid": "uid-demo", "kind": "FineTuneJob", "name": "demo"}]},
        "spec": {"suspend": suspend, "backoffLimit": 3, "activeDeadlineSeconds": 600},
        "status": {"conditions": conditions or [], **status},
    }


def jcond(ctype: str, reason: str = "", message: str = "", when: str = "2026-01-01T01:00:00Z") -> dict[str, Any]:
    return {"type": ctype, "status": "True", "reason": reason, "message": message, "lastTransitionTime": when}


def pod_dict(name: str, phase: str, created: str = T0, *, waiting: tuple[str, str] | None = None,
             terminated: dict[str, Any] | None = None, unschedulable: str | None = None,
             reason: str | None = None) -> dict[str, Any]:
    """A pod as the kubelet/scheduler report it."""
    status: dict[str, Any] = {"phase": phase, "conditions": []}
    if reason:
        status["reason"] = reason
    state: dict[str, Any] = {}
    if waiting:
        state["waiting"] = {"reason": waiting[0], "message": waiting[1]}
    elif terminated is not None:
        state["terminated"] = terminated
    elif phase == "Running":
        state["running"] = {"startedAt": created}
    if unschedulable:
        status["conditions"].append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                     "message": unschedulable})
    if state:
        status["containerStatuses"] = [{"name": "trainer", "state": state, "ready": phase == "Running"}]
    return {"metadata": {"name": name, "namespace": "team-a", "creationTimestamp": created}, "status": status}


def term_msg(reason: str, message: str, **result: Any) -> str:
    return json.dumps({"reason": reason, "message": message, "result": result})


FTJ_SPEC: dict[str, Any] = {
    "model": {"uri": "s3://models/tiny-llama", "secretRef": {"name": "hf-token"}},
    "dataset": {"source": "jsonl", "uri": "s3://data/train.jsonl"},
    "training": {"maxSteps": 10},
    "output": {"uri": "s3://out/run-1"},
    "storage": {"endpoint": "http://minio.storage:9000", "secretRef": {"name": "s3-creds"}},
    "resources": {"gpus": 1},
    "prepare": {"mode": "inline"},  # one Job: the prepare stage's own tests set "separate"
}


def make_body(kind: str, spec: dict[str, Any], name: str = "demo", namespace: str = "team-a",
              status: dict[str, Any] | None = None, generation: int = 1) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}", "generation": generation},
        "spec": copy.deepcopy(spec),
    }
    if status is not None:
        body["status"] = status
    return body
