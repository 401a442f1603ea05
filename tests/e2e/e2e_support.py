"""Helpers shared by the pod-runner and end-to-end tests (the fixtures are in conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "hack") not in sys.path:
    sys.path.insert(0, str(REPO / "hack"))

import podrunner  # noqa: E402

EXISTING_KUBECONFIG = os.environ.get("KUBETUNE_E2E_KUBECONFIG")
RUNNER_NODE = "runner-node"
RUNNER_SELECTOR = {"kubetune.dev/runner": "true"}
BUCKET = "kubetune-e2e"
S3_SECRET = "s3-credentials"
OPERATOR_SA = "kubetune-operator"


def wait_for(fn: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    """Poll ``fn`` until it returns something truthy; fail with the last value after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


@dataclass
class Cluster:
    """A cluster to test against: admin kubeconfig, REST access and kubectl."""

    kubeconfig: Path
    local: Any = None  # hack/cluster.py LocalCluster when we started it
    kube: podrunner.Kube = field(init=False)

    def __post_init__(self) -> None:
        self.kube = podrunner.Kube(self.kubeconfig)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                kubeconfig: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = ["kubectl", f"--kubeconfig={kubeconfig or self.kubeconfig}", *args]
        r = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd[2:])} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r

    def apply(self, *docs: dict[str, Any], namespace: str | None = None) -> None:
        ns = ["-n", namespace] if namespace else []
        self.kubectl("apply", *ns, "-f", "-", input=yaml.safe_dump_all(docs))

    def get(self, path: str) -> Any:
        return self.kube.request("GET", path, ok404=True)

    def create_namespace(self, prefix: str) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self.kube.request("POST", "/api/v1/namespaces", {"metadata": {"name": name}})
        wait_for(lambda: self.get(f"/api/v1/namespaces/{name}/serviceaccounts/default"), 30,
                 f"the default ServiceAccount of {name}")
        return name

    def delete_namespace(self, name: str) -> None:
        self.kube.request("DELETE", f"/api/v1/namespaces/{name}", ok404=True)


def offline_env() -> dict[str, str]:
    """Env every pod process gets from the runner: no hub access, offline W&B."""
    env = {k: v for k, v in os.environ.items() if k.startswith(("HF_", "TRANSFORMERS_", "WANDB_"))}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"})
    return env



# ----------------------------------------------------------------------------------------------
# The kubetune system: CRDs, RBAC, operator, storage
# ----------------------------------------------------------------------------------------------


@dataclass
class System:
    """Everything a FineTuneJob needs: namespace, storage Secret, S3 (bucket, model, datasets)."""

    cluster: Cluster
    namespace: str
    s3: Any  # localenv.S3Server-like: .client(), .endpoint
    pod_endpoint: str
    model_uri: str
    dataset_uri: str
    bad_dataset_uri: str
    operator_log: Path | None = None
    runner: podrunner.PodRunner | None = None
    operator_logs: Callable[[], str] | None = None  # the chart's operator (real node)

    def resource(self, plural: str, name: str) -> dict[str, Any] | None:
        return self.cluster.get(f"/apis/kubetune.dev/v1alpha1/namespaces/{self.namespace}/{plural}/{name}")

    def storage(self) -> dict[str, Any]:
        return {"endpoint": self.pod_endpoint, "secretRef": {"name": S3_SECRET}}

    def s3_keys(self, uri: str) -> list[str]:
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        pages = self.s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [o["Key"][len(prefix):].lstrip("/") for page in pages for o in page.get("Contents", [])]

    def s3_json(self, uri: str) -> Any:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        return json.loads(self.s3.client().get_object(Bucket=bucket, Key=key)["Body"].read())

    def pods(self, label_selector: str) -> list[dict[str, Any]]:
        r = self.cluster.kube.request("GET", f"/api/v1/namespaces/{self.namespace}/pods",
                                      query={"labelSelector": label_selector})
        return list(r.get("items", []))

    def diagnostics(self) -> str:
        """Operator log tail and the pods' logs, for assertion messages."""
        parts = []
        if self.operator_log and self.operator_log.exists():
            parts.append("--- operator log (tail) ---\n" + podrunner.log_tail(self.operator_log.read_text(), 60, 8000))
        if self.operator_logs is not None:
            parts.append("--- operator log (tail) ---\n" + self.operator_logs())
        if self.runner is None and self.cluster.local is not None:  # real kubelet: kubectl logs
            for pod in self.pods(""):
                name = pod["metadata"]["name"]
                r = self.cluster.kubectl("logs", "-n", self.namespace, name, "--tail=40", check=False)
                state = [c.get("state") for c in (pod.get("status") or {}).get("containerStatuses") or []]
                parts.append(f"--- pod {name} ({pod['status'].get('phase')}, {state}) ---\n{r.stdout}{r.stderr}")
        if self.runner is not None:
            for run in list(self.runner.runs.values()):
                if run.namespace == self.namespace and run.log_path.exists():
                    parts.append(f"--- pod {run.name} ({run.phase}) ---\n"
                                 + podrunner.log_tail(run.log_path.read_text(errors="replace"), 40, 6000))
        return "\n".join(parts)


def dataset_lines(n: int) -> str:
    topics = ["kubernetes", "qlora", "s3", "operators", "adapters", "tokenizers", "gradients", "checkpoints"]
    rows = [{"text": f"Question: what is {t}?\nAnswer: {t} is a topic number {i} in the kubetune demo data."}
            for i, t in ((i, topics[i % len(topics)]) for i in range(n))]
    return "".join(json.dumps(r) + "\n" for r in rows)
