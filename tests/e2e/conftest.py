"""Fixtures for the pod-runner and end-to-end tests.

Three ways to get a cluster:

* default: a real local control plane (``hack/cluster.py``: etcd, kube-apiserver,
  controller-manager, scheduler, kwok) plus the pod runner (``hack/podrunner.py``) playing
  kubelet for ``runner-node``; the operator runs here as a subprocess with a ServiceAccount
  token bound to the chart's ClusterRole.
* ``real``: the same control plane with a node run by a real kubelet + containerd
  (``hack/realnode.py``), the images built from the Dockerfile (``hack/images.sh``) and the operator
  installed by ``helm install`` of the chart (``hack/realnode_env.py``). Every test that takes
  ``system`` runs on both; ``real_system`` tests run only there. ``KUBETUNE_REAL_NODE=1`` requires
  it (CI), ``0`` leaves it out; unset, it runs where root, containerd and dockerd are present.
* ``KUBETUNE_E2E_KUBECONFIG=<path>``: an existing cluster (kind, see ``hack/e2e-kind.sh``) with
  the CRDs and the chart (operator) already installed and real kubelets. The S3 server must then
  be reachable from the pods: ``KUBETUNE_E2E_S3_ENDPOINT`` (used by the tests) and
  ``KUBETUNE_E2E_S3_POD_ENDPOINT`` (written into the specs; defaults to the former).
"""

from __future__ import annotations

import os
import shutil
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


def real_node_unavailable() -> str | None:
    """Why the real node cannot run here (None: it can)."""
    import realnode

    missing = realnode.missing_prerequisites()
    for exe in ("dockerd", "debootstrap"):
        if not shutil.which(exe):
            missing.append(f"{exe} (apt-get install docker.io debootstrap)")
    return "; ".join(missing) or None


@pytest.fixture(scope="session")
def real_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Images (cached), the control plane with the real node, S3 on the node's address, the chart."""
    wanted = os.environ.get("KUBETUNE_REAL_NODE")
    why = real_node_unavailable()
    if wanted == "0":
        pytest.skip("KUBETUNE_REAL_NODE=0")
    if EXISTING_KUBECONFIG:
        pytest.skip("an existing cluster (KUBETUNE_E2E_KUBECONFIG): its kubelets run the [podrunner] tests")
    if why:
        if wanted == "1":
            pytest.fail(f"KUBETUNE_REAL_NODE=1 but the real node cannot run here: {why}")
        pytest.skip(f"the real node needs {why} (CI installs them and sets KUBETUNE_REAL_NODE=1)")
    import realnode_env

    env = realnode_env.RealNodeEnv.start(tmp_path_factory.mktemp("real-node"))
    print(f"\nreal node: {env.timings}; control plane logs: {env.cluster.run_dir / 'logs'}")
    try:
        yield env
    finally:
        env.stop()


@pytest.fixture(scope="session", params=["podrunner", "real"])
def system(request: pytest.FixtureRequest, tiny_model_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    """CRDs + RBAC + operator + S3 with a tiny model and datasets, ready for jobs: on the pod runner's
    node (operator as a local process) or on the real node (operator from the chart)."""
    if request.param == "real":
        env = request.getfixturevalue("real_env")
        yield from _system(Cluster(env.cluster.kubeconfig, env.cluster), None, env.s3, tiny_model_dir,
                           tmp_path_factory, operator_from_chart=env)
        return
    yield from _system(request.getfixturevalue("cluster"), request.getfixturevalue("session_runner"),
                       request.getfixturevalue("e2e_s3"), tiny_model_dir, tmp_path_factory)


@pytest.fixture(scope="session")
def real_system(real_env: Any, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    """The real node's system, for the tests only a real kubelet can answer (OOM, image pulls, PSS)."""
    yield from _system(Cluster(real_env.cluster.kubeconfig, real_env.cluster), None, real_env.s3, tiny_model_dir,
                       tmp_path_factory, operator_from_chart=real_env)


def _system(cluster: Cluster, session_runner: podrunner.PodRunner | None, e2e_s3: Any, tiny_model_dir: Path,
            tmp_path_factory: pytest.TempPathFactory, operator_from_chart: Any = None) -> Iterator[System]:
    s3 = e2e_s3
    client = s3.client()
    if BUCKET not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=BUCKET)
    model_uri = s3.upload_dir(tiny_model_dir, BUCKET, "models/tiny-llama")
    client.put_object(Bucket=BUCKET, Key="data/train.jsonl", Body=dataset_lines(64).encode())
    client.put_object(Bucket=BUCKET, Key="data/bad.jsonl", Body=b'{"text": "ok"}\nthis is not json\n')

    ns = cluster.create_namespace("e2e")
    if operator_from_chart is not None:  # every pod of the real node's tests passes `restricted`
        cluster.kube.request("PATCH", f"/api/v1/namespaces/{ns}",
                             {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted",
                                                      "pod-security.kubernetes.io/enforce-version": "latest"}}},
                             content_type="application/merge-patch+json")
    cluster.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": S3_SECRET},
                   "stringData": dict(s3.env)}, namespace=ns)
    logs = tmp_path_factory.mktemp("e2e-logs")
    operator: subprocess.Popen[bytes] | None = None
    system = System(cluster, ns, s3, os.environ.get("KUBETUNE_E2E_S3_POD_ENDPOINT", s3.endpoint), model_uri,
                    f"s3://{BUCKET}/data/train.jsonl", f"s3://{BUCKET}/data/bad.jsonl")
    try:
        if operator_from_chart is not None:
            system.operator_logs = operator_from_chart.operator_logs
        elif cluster.local is not None:
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
