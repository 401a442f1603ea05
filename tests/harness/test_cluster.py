"""Integration tests for the local control plane (hack/cluster.py).

Needs the cached binaries (``python hack/cluster.py build``; built on demand
otherwise, which takes many minutes) and kubectl on PATH.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import cluster as cluster_mod
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def wait_for(fn, timeout: float = 30.0, what: str = "condition", interval: float = 0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last={last!r}")


@pytest.fixture
def ns(local_cluster):
    name = f"t-{uuid.uuid4().hex[:8]}"
    local_cluster.request("POST", "/api/v1/namespaces", {"metadata": {"name": name}})
    wait_for(
        lambda: local_cluster.request("GET", f"/api/v1/namespaces/{name}/serviceaccounts/default", ok404=True),
        30,
        "default ServiceAccount",
    )
    yield name
    local_cluster.request("DELETE", f"/api/v1/namespaces/{name}", ok404=True)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _gpu_pod_spec(gpus: int, restart: str = "Never") -> dict:
    return {
        "restartPolicy": restart,
        "nodeSelector": {"type": "kwok"},
        "containers": [
            {
                "name": "main",
                "image": "busybox",
                "command": ["true"],
                "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
            }
        ],
    }


# ----------------------------------------------------------------------------- components
def test_all_components_reachable(local_cluster):
    c = local_cluster
    assert cluster_mod._http(f"{c.server}/readyz?verbose", c.ssl_context())[0] == 200
    assert cluster_mod._http(f"{c.server}/livez", c.ssl_context())[0] == 200
    assert cluster_mod._http(f"{c.etcd_url}/health")[0] == 200
    ins = cluster_mod._insecure_ctx()
    for comp in ("kube-controller-manager", "kube-scheduler"):
        assert cluster_mod._http(f"https://127.0.0.1:{c.ports[comp]}/healthz", ins)[0] == 200, comp
    assert cluster_mod._http(f"http://127.0.0.1:{c.ports['kwok']}/healthz")[0] == 200
    assert all(c.component_status().values()), c.component_status()
    version = c.request("GET", "/version")
    assert version["gitVersion"] == cluster_mod.K8S_VERSION
    out = c.kubectl("get", "--raw", "/readyz").stdout
    assert out.strip() == "ok"


def test_node_layout(local_cluster):
    nodes = {n["metadata"]["name"]: n for n in local_cluster.request("GET", "/api/v1/nodes")["items"]}
    assert set(nodes) == {"gpu-node-1", "gpu-node-2", "cpu-node-1", "runner-node"}
    for name in ("gpu-node-1", "gpu-node-2"):
        n = nodes[name]
        assert n["status"]["allocatable"]["nvidia.com/gpu"] == "8"
        assert n["metadata"]["labels"]["nvidia.com/gpu.present"] == "true"
        assert n["metadata"]["annotations"][cluster_mod.KWOK_ANNOTATION] == "fake"
    assert "nvidia.com/gpu" not in nodes["cpu-node-1"]["status"]["allocatable"]
    runner = nodes["runner-node"]
    assert runner["metadata"]["labels"]["kubetune.dev/runner"] == "true"
    assert runner["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert cluster_mod.KWOK_ANNOTATION not in runner["metadata"].get("annotations", {})
    for n in nodes.values():
        assert not n["spec"].get("taints"), (n["metadata"]["name"], n["spec"].get("taints"))
        ready = [x for x in n["status"]["conditions"] if x["type"] == "Ready"]
        assert ready and ready[0]["status"] == "True", n["metadata"]["name"]
    # the helper for the pod runner refreshes the Lease + Ready condition
    local_cluster.heartbeat_node("runner-node")
    lease = local_cluster.request("GET", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/runner-node")
    assert lease["spec"]["holderIdentity"] == "runner-node"


# ----------------------------------------------------------------------------- controllers
def test_job_pod_scheduled_on_kwok_gpu_node_and_completes(local_cluster, ns):
    c = local_cluster
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "gpu-job"},
        "spec": {"backoffLimit": 0, "ttlSecondsAfterFinished": 600, "template": {"spec": _gpu_pod_spec(1)}},
    }
    c.request("POST", f"/apis/batch/v1/namespaces/{ns}/jobs", job)

    def pod():
        items = c.request("GET", f"/api/v1/namespaces/{ns}/pods?labelSelector=job-name%3Dgpu-job")["items"]
        return items[0] if items and items[0]["status"].get("phase") in ("Running", "Succeeded") else None

    p = wait_for(pod, 30, "job pod Running/Succeeded")
    assert p["spec"]["nodeName"] in ("gpu-node-1", "gpu-node-2")

    def complete():
        j = c.request("GET", f"/apis/batch/v1/namespaces/{ns}/jobs/gpu-job")
        return any(x["type"] == "Complete" and x["status"] == "True" for x in j["status"].get("conditions", []))

    wait_for(complete, 45, "Job Complete")


def test_scheduler_refuses_16_gpus(local_cluster, ns):
    c = local_cluster
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "too-big"}, "spec": _gpu_pod_spec(16)}
    pod["spec"].pop("nodeSelector")
    c.request("POST", f"/api/v1/namespaces/{ns}/pods", pod)

    def unschedulable():
        p = c.request("GET", f"/api/v1/namespaces/{ns}/pods/too-big")
        return next(
            (
                x
                for x in p["status"].get("conditions", [])
                if x["type"] == "PodScheduled" and x["status"] == "False" and x.get("reason") == "Unschedulable"
            ),
            None,
        )

    cond = wait_for(unschedulable, 30, "PodScheduled=False/Unschedulable")
    assert "nvidia.com/gpu" in cond.get("message", "")


def test_garbage_collector_deletes_dependents(local_cluster, ns):
    c = local_cluster
    owner = c.request("POST", f"/api/v1/namespaces/{ns}/configmaps", {"metadata": {"name": "owner"}})
    c.request(
        "POST",
        f"/api/v1/namespaces/{ns}/configmaps",
        {
            "metadata": {
                "name": "dependent",
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"]}
                ],
            }
        },
    )
    c.request("DELETE", f"/api/v1/namespaces/{ns}/configmaps/owner")
    wait_for(
        lambda: c.request("GET", f"/api/v1/namespaces/{ns}/configmaps/dependent", ok404=True) is None,
        30,
        "dependent garbage-collected",
    )


# ----------------------------------------------------------------------------- authn / authz
def test_rbac_enforced_for_service_account_token(local_cluster, ns):
    c = local_cluster
    c.request("POST", f"/api/v1/namespaces/{ns}/serviceaccounts", {"metadata": {"name": "nobody"}})
    token = c.create_token(ns, "nobody")
    kc = c.kubeconfig_for_token(token)
    assert Path(kc).exists()

    r = subprocess.run(["kubectl", f"--kubeconfig={kc}", "-n", ns, "get", "pods"], capture_output=True, text=True)
    assert r.returncode != 0 and "forbidden" in r.stderr.lower(), r.stderr
    assert f"system:serviceaccount:{ns}:nobody" in r.stderr
    r = subprocess.run(
        [
            "kubectl",
            f"--server={c.server}",
            f"--certificate-authority={c.ca_file}",
            f"--token={token}",
            "--kubeconfig=/dev/null",
            "-n",
            ns,
            "get",
            "secrets",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "forbidden" in r.stderr.lower(), r.stderr
    with pytest.raises(cluster_mod.ApiError) as ei:
        c.request("GET", f"/api/v1/namespaces/{ns}/configmaps", token=token)
    assert ei.value.status == 403
    with pytest.raises(cluster_mod.ApiError) as ei:
        c.request("GET", "/api/v1/nodes", token="not-a-valid-token")
    assert ei.value.status == 401

    # granting a Role makes the same token work: authentication is fine, authorization decides
    c.request(
        "POST",
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
        {
            "metadata": {"name": "read-cm"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}],
        },
    )
    c.request(
        "POST",
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
        {
            "metadata": {"name": "read-cm"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-cm"},
            "subjects": [{"kind": "ServiceAccount", "name": "nobody", "namespace": ns}],
        },
    )
    wait_for(
        lambda: (
            subprocess.run(
                ["kubectl", f"--kubeconfig={kc}", "-n", ns, "get", "configmaps"], capture_output=True
            ).returncode
            == 0
        ),
        10,
        "RBAC grant effective",
    )


# ----------------------------------------------------------------------------- failures / cleanup
def _alive(info: dict) -> bool:
    return cluster_mod._alive(info["pid"], info.get("start_time"))


def test_occupied_port_is_reported_with_component_name():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(cluster_mod.ComponentError) as ei:
            cluster_mod.LocalCluster.start(port_overrides={"kube-apiserver": port}, timeout=60)
    err = ei.value
    assert err.component == "kube-apiserver"
    assert "kube-apiserver failed to start" in str(err)
    assert "address already in use" in str(err).lower()
    assert not Path(err.run_dir).exists()
    assert set(err.processes) == {"etcd", "kube-apiserver"}
    assert not any(_alive(i) for i in err.processes.values())  # etcd was stopped again


def test_bogus_flag_is_reported_with_component_name():
    with pytest.raises(cluster_mod.ComponentError) as ei:
        cluster_mod.LocalCluster.start(extra_args={"etcd": ["--no-such-flag"]}, timeout=30)
    assert ei.value.component == "etcd"
    assert "no-such-flag" in str(ei.value)
    assert not Path(ei.value.run_dir).exists()
    assert not any(_alive(i) for i in ei.value.processes.values())


def test_cli_up_status_env_down_leaves_nothing_behind(tmp_path):
    env = dict(os.environ, KUBETUNE_RUN_STATE=str(tmp_path / "cluster.json"))
    cli = [sys.executable, str(REPO / "hack" / "cluster.py")]
    up = subprocess.run([*cli, "up"], env=env, capture_output=True, text=True, timeout=180)
    assert up.returncode == 0, up.stderr
    state = json.loads((tmp_path / "cluster.json").read_text())
    try:
        assert subprocess.run([*cli, "up"], env=env, capture_output=True, text=True).returncode == 0  # idempotent
        st = subprocess.run([*cli, "status"], env=env, capture_output=True, text=True)
        assert st.returncode == 0, st.stdout + st.stderr
        out = subprocess.run([*cli, "env"], env=env, capture_output=True, text=True).stdout
        assert out.strip() == f"export KUBECONFIG={state['kubeconfig']}"
        r = subprocess.run(
            ["kubectl", f"--kubeconfig={state['kubeconfig']}", "get", "nodes", "-o", "name"],
            capture_output=True,
            text=True,
        )
        assert "node/runner-node" in r.stdout, r.stderr
        assert set(state["processes"]) == set(cluster_mod.COMPONENTS)
        assert all(_alive(i) for i in state["processes"].values())
    finally:
        down = subprocess.run([*cli, "down"], env=env, capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    assert not (tmp_path / "cluster.json").exists()
    assert not Path(state["run_dir"]).exists()
    assert not any(_alive(i) for i in state["processes"].values())
    for name, port in state["ports"].items():
        assert not _port_open(port), f"{name} port {port} still open"
    assert subprocess.run([*cli, "status"], env=env, capture_output=True).returncode == 1
