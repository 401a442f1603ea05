"""Fixtures for the pod-runner and end-to-end tests.

Two ways to get a cluster, one switch:

* default: a real local control plane (``hack/cluster.py``: etcd, kube-apiserver,
  controller-manager, scheduler, kwok) plus the pod runner (``hack/podrunner.py``) playing
  kubelet for ``runner-node``; the operator runs here as a subprocess with a ServiceAccount
  token bound to the chart's ClusterRole.
* ``KUBETUNE_E2E_KUBECONFIG=<path>``: an existing cluster (kind, see ``hack/e2e-kind.sh``) with
  the CRDs and the chart (operator) already installed and real kubelets. The S3 server must then
  be reachable from the pods: ``KUBETUNE_E2E_S3_ENDPOINT`` (used by the tests) and
  ``KUBETUNE_E2E_S3_POD_ENDPOINT`` (written into the specs; defaults to the former).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import demo  # hack/demo.py: CRDs, operator identity and process (tests/conftest.py puts hack/ on sys.path)
import pytest
from e2e_support import (
    BUCKET,
    EXISTING_KUBECONFIG,
    RUNNER_NODE,
    S3_SECRET,
    Cluster,
    System,
    dataset_lines,
    offline_env,
    podrunner,
)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """The local control plane (or the cluster of KUBETUNE_E2E_KUBECONFIG)."""
    if EXISTING_KUBECONFIG:
        yield Cluster(Path(EXISTING_KUBECONFIG))
        return
    import cluster as cluster_mod

    local = cluster_mod.LocalCluster.start()
    try:
        yield Cluster(local.kubeconfig, local)
    finally:
        local.stop()


@pytest.fixture(scope="session")
def session_runner(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[podrunner.PodRunner | None]:
    """The one pod runner of the session (None on a real cluster, which has kubelets)."""
    if cluster.local is None:
        yield None
        return
    workdir = tmp_path_factory.mktemp("podrunner")
    r = podrunner.PodRunner(cluster.kubeconfig, node=RUNNER_NODE, workdir=workdir, extra_env=offline_env())
    r.start()
    print(f"\npod logs: {r.log_dir}")
    try:
        yield r
    finally:
        r.stop(timeout=10)


@pytest.fixture
def runner(session_runner: podrunner.PodRunner | None) -> podrunner.PodRunner:
    if session_runner is None:
        pytest.fail("the pod runner tests need the local cluster; run the kind suite with -m e2e")
    return session_runner


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    """A fresh namespace per test."""
    name = cluster.create_namespace("t")
    yield name
    cluster.delete_namespace(name)


@pytest.fixture(scope="session")
def e2e_s3(request: pytest.FixtureRequest) -> Any:
    """The S3 server the pods use: the shared ``s3`` fixture (moto on 127.0.0.1), or the server of
    KUBETUNE_E2E_S3_ENDPOINT (kind: started by hack/e2e-kind.sh, reachable from the pods)."""
    import localenv

    endpoint = os.environ.get("KUBETUNE_E2E_S3_ENDPOINT")
    if not endpoint:
        return request.getfixturevalue("s3")
    server = localenv.S3Server(port=int(endpoint.rsplit(":", 1)[1]))
    server.endpoint = endpoint
    return server


@pytest.fixture(scope="session")
def system(cluster: Cluster, session_runner: podrunner.PodRunner | None, e2e_s3: Any, tiny_model_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    """CRDs + RBAC + operator + pod runner + S3 with a tiny model and datasets, ready for jobs."""
    s3 = e2e_s3
    client = s3.client()
    if BUCKET not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=BUCKET)
    model_uri = s3.upload_dir(tiny_model_dir, BUCKET, "models/tiny-llama")
    client.put_object(Bucket=BUCKET, Key="data/train.jsonl", Body=dataset_lines(64).encode())
    client.put_object(Bucket=BUCKET, Key="data/bad.jsonl", Body=b'{"text": "ok"}\nthis is not json\n')

    ns = cluster.create_namespace("e2e")
    cluster.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": S3_SECRET},
                   "stringData": dict(s3.env)}, namespace=ns)
    logs = tmp_path_factory.mktemp("e2e-logs")
    operator: subprocess.Popen[bytes] | None = None
    system = System(cluster, ns, s3, os.environ.get("KUBETUNE_E2E_S3_POD_ENDPOINT", s3.endpoint), model_uri,
                    f"s3://{BUCKET}/data/train.jsonl", f"s3://{BUCKET}/data/bad.jsonl")
    try:
        if cluster.local is not None:
            demo.install_crds(cluster.kubeconfig)
            system.operator_log = logs / "operator.log"
            kubeconfig = demo.operator_kubeconfig(cluster.local, ns)
            operator = demo.start_operator(kubeconfig, ns, system.operator_log)
            system.runner = session_runner
            print(f"\noperator log: {system.operator_log}")
        yield system
    finally:
        demo.stop_process(operator)
        cluster.delete_namespace(ns)
