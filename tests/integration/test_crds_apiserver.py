"""The generated CRDs against a real kube-apiserver: accepted, defaults applied, bad manifests
rejected with a clear message by `kubectl apply`, the spec immutable except `suspend`, and
`kubectl explain` / printer columns useful."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from manifests import METHOD_CASES, METHOD_OK, minimal_ftj, minimal_mj, with_change, with_changes

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


class Kubectl:
    def __init__(self, kubeconfig: Path, namespace: str):
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        self.namespace = namespace

    def __call__(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(["kubectl", "-n", self.namespace, *args], input=stdin, capture_output=True, text=True,
                             env=self.env, timeout=60)
        if check and out.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{out.stderr}")
        return out

    def apply(self, doc: dict[str, Any], check: bool = True) -> subprocess.CompletedProcess[str]:
        return self("apply", "-f", "-", stdin=yaml.safe_dump(doc), check=check)


@pytest.fixture(scope="module")
def kubectl(crds_installed: Any) -> Kubectl:
    ns = f"crd-{uuid.uuid4().hex[:6]}"
    k = Kubectl(crds_installed.kubeconfig, ns)
    k("create", "namespace", ns)
    return k


def named(doc: dict[str, Any], name: str) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    doc["metadata"]["name"] = name
    return doc


def test_crds_are_accepted_and_apply_defaults(kubectl: Kubectl) -> None:
    kubectl.apply(named(minimal_ftj(), "defaults"))
    got = json.loads(kubectl("get", "ftj", "defaults", "-o", "json").stdout)
    spec = got["spec"]
    assert spec["quantization"] == {"bits": 4, "type": "nf4", "doubleQuant": True, "computeDtype": "bfloat16"}
    assert spec["lora"]["r"] == 16 and spec["lora"]["targetModules"] == ["all-linear"]
    assert spec["training"]["packing"] == "bfd" and spec["resources"]["gpus"] == 1
    kubectl.apply(named(minimal_mj(), "merge-defaults"))
    merged = json.loads(kubectl("get", "mj", "merge-defaults", "-o", "json").stdout)
    assert merged["spec"]["resources"]["gpus"] == 0 and merged["spec"]["dtype"] == "bfloat16"


@pytest.mark.parametrize(
    "path,value,message",
    [
        ("quantization", {"type": "int4"}, 'Unsupported value: "int4"'),
        ("lora", {"r": 0}, "should be greater than 0"),
        ("model", {"name": "a/b", "uri": "s3://models/x"}, "set exactly one of model.name and model.uri"),
        ("training", {"maxSteps": 5, "epochs": 1}, "set exactly one of training.maxSteps and training.epochs"),
        ("dataset", {"source": "jsonl", "uri": "x", "eval": {"split": "t", "fraction": 0.5}},
         "set exactly one of dataset.eval.split and dataset.eval.fraction"),
        ("dataset", {"source": "jsonl", "uri": "x", "format": "template"}, "dataset.template is required"),
        ("output", {"uri": "/tmp/out"}, "spec.output.uri: Invalid value"),
        ("storage", {"accessKeyId": "AKIA", "secretAccessKey": "x"}, 'unknown field "spec.storage.accessKeyId"'),
        ("tracking", {"wandb": {"project": "p"}}, "tracking.wandb.secretRef (the API key) is required"),
        ("training", {"maxSteps": 5, "earlyStopping": {"patience": 2}},
         "training.earlyStopping and training.keepBest need evaluation data: set dataset.eval"),
        ("training", {"maxSteps": 5, "keepBest": True},
         "training.earlyStopping and training.keepBest need evaluation data: set dataset.eval"),
        ("resources", {"gpus": 0, "nodes": 2}, "resources.nodes > 1 needs resources.gpus >= 1"),
        ("resources", {"gpus": 1, "nodes": 0}, "spec.resources.nodes: Invalid value"),
        ("training", {"maxSteps": 5, "distributed": "fsdp"},  # gpus defaults to 1: one rank
         "training.distributed fsdp shards the model over ranks: it needs more than one"),
        ("training", {"maxSteps": 5, "distributed": "zero3"}, 'Unsupported value: "zero3"'),
        ("pod", {"env": [{"name": "KUBETUNE_UID", "value": "x"}]}, "KUBETUNE_* variables are the operator's"),
        ("pod", {"env": [{"name": "A", "value": "x", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]},
         "set value or valueFrom, not both"),
        ("pod", {"labels": {"kubetune.dev/kind": "x"}}, "spec.pod.labels may not use the prefixes"),
        ("pod", {"volumes": [{"name": "work", "emptyDir": {}}]}, "spec.pod.volumes may not be named"),
        ("pod", {"volumeMounts": [{"name": "data", "mountPath": "/tmp"}]}, "spec.pod.volumeMounts may not mount over"),
        ("pod", {"runAsUser": 0}, "spec.pod.runAsUser: Invalid value"),
    ],
)
def test_bad_manifests_are_rejected_with_a_clear_message(kubectl: Kubectl, path: str, value: Any,
                                                          message: str) -> None:
    doc = named(with_change(minimal_ftj(), path, value), f"bad-{uuid.uuid4().hex[:6]}")
    out = kubectl.apply(doc, check=False)
    assert out.returncode != 0, f"accepted a bad manifest ({path}={value})"
    assert message in out.stderr, out.stderr
    assert kubectl("get", "ftj", doc["metadata"]["name"], check=False).returncode != 0


@pytest.mark.parametrize("changes, message", METHOD_CASES)
def test_methods_need_their_data_at_admission(kubectl: Kubectl, changes: dict[str, Any], message: str) -> None:
    doc = named(with_changes(minimal_ftj(), changes), f"method-{uuid.uuid4().hex[:6]}")
    out = kubectl.apply(doc, check=False)
    assert out.returncode != 0 and message in out.stderr, out.stderr


def test_methods_with_their_data_are_admitted(kubectl: Kubectl) -> None:
    for i, changes in enumerate(METHOD_OK):
        kubectl.apply(named(with_changes(minimal_ftj(), changes), f"method-ok-{i}"))


def test_ranks_accepted_and_mergejob_runs_in_one_pod(kubectl: Kubectl) -> None:
    kubectl.apply(named(with_change(with_change(minimal_ftj(), "resources", {"gpus": 2, "nodes": 2}),
                                    "training", {"maxSteps": 5, "distributed": "fsdp"}), "ranks"))
    got = json.loads(kubectl("get", "ftj", "ranks", "-o", "json").stdout)["spec"]
    assert (got["resources"]["nodes"], got["training"]["distributed"]) == (2, "fsdp")
    out = kubectl.apply(named(with_change(minimal_mj(), "resources", {"nodes": 2}), "merge-nodes"), check=False)
    assert out.returncode != 0 and "a MergeJob runs in one pod: resources.nodes must be 1" in out.stderr, out.stderr


def test_spec_is_immutable_except_suspend(kubectl: Kubectl) -> None:
    kubectl.apply(named(minimal_ftj(), "immutable"))
    changed = with_change(named(minimal_ftj(), "immutable"), "lora", {"r": 64})
    out = kubectl.apply(changed, check=False)
    assert out.returncode != 0 and "spec is immutable after creation (only spec.suspend may change)" in out.stderr
    added = with_change(named(minimal_ftj(), "immutable"), "queueName", "team-a")  # adding a field counts too
    assert kubectl.apply(added, check=False).returncode != 0
    kubectl.apply(with_change(named(minimal_ftj(), "immutable"), "suspend", True))
    got = json.loads(kubectl("get", "ftj", "immutable", "-o", "json").stdout)
    assert got["spec"]["suspend"] is True


def test_mergejob_spec_is_immutable(kubectl: Kubectl) -> None:
    kubectl.apply(named(minimal_mj(), "merge-immutable"))
    out = kubectl.apply(with_change(named(minimal_mj(), "merge-immutable"), "dtype", "float32"), check=False)
    assert out.returncode != 0 and "spec is immutable" in out.stderr


def test_explain_and_printer_columns(kubectl: Kubectl) -> None:
    explain = kubectl("explain", "finetunejob.spec.lora.r").stdout
    assert "Rank of the update matrices" in explain
    for field, words in (("finetunejob.spec.pod.serviceAccountName", "workload identity"),
                         ("finetunejob.spec.modelCache.claimName", "PersistentVolumeClaim"),
                         ("finetunejob.spec.resources.nodes", "Indexed Job"),
                         ("finetunejob.spec.training.distributed", "FSDP"),
                         ("finetunejob.spec.prepare.mode", "CPU-only Job"),
                         ("mergejob.spec.queueName", "Kueue"),
                         ("mergejob.spec.workloadPriorityClassName", "WorkloadPriorityClass")):
        assert words in kubectl("explain", field).stdout, field
    kubectl.apply(named(minimal_ftj(), "columns"))
    kubectl("patch", "ftj", "columns", "--subresource=status", "--type=merge", "-p",
            json.dumps({"status": {"phase": "Running", "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                   "progress": {"percent": 42, "loss": 1.25, "eta": "3m"}, "stage": "training"}}))
    table = kubectl("get", "ftj", "columns").stdout.splitlines()
    assert table[0].split() == ["NAME", "PHASE", "MODEL", "PROGRESS", "LOSS", "ETA", "STAGE", "AGE"]
    assert table[1].split()[:7] == ["columns", "Running", "HuggingFaceTB/SmolLM2-135M-Instruct", "42", "1.25", "3m",
                                    "training"]
    assert "columns" in kubectl("get", "kubetune").stdout  # the category
    assert "columns" in kubectl("get", "ftj").stdout  # the short name


def test_status_schema_prunes_unknown_fields(kubectl: Kubectl) -> None:
    kubectl.apply(named(minimal_ftj(), "pruned"))
    kubectl("patch", "ftj", "pruned", "--subresource=status", "--type=merge", "-p",
            json.dumps({"status": {"phase": "Pending", "kopf": {"progress": {}}}}))
    status = json.loads(kubectl("get", "ftj", "pruned", "-o", "json").stdout)["status"]
    assert status == {"phase": "Pending"}
