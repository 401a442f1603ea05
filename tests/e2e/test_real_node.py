"""What only a real kubelet answers: the images built from the Dockerfile in real containers, the
memory cgroup, image pulls, a pod deleted under a running job, and the restricted Pod Security
profile with a read-only root filesystem.

The ``real_system`` fixture (``tests/e2e/conftest.py``) is the local control plane with a node run
by kubelet + containerd + runc (``hack/realnode.py``), kube-proxy and CoreDNS, the operator
installed by ``helm install`` of ``charts/kubetune`` with the images of ``hack/images.sh``, and S3
on the node's bridge address. Its namespace enforces the ``restricted`` Pod Security Standard, so
every pod below (and in ``test_e2e.py``'s ``[real]`` runs) passed it. The tests that run on both
nodes (happy path + merge, bad data, suspend/resume) are in ``test_e2e.py``.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from e2e_support import System, wait_for
from test_e2e import FTJ, RUN_TIMEOUT, condition, finetune, wait_phase

pytestmark = [pytest.mark.e2e, pytest.mark.realnode]


def events_for(system: System, name: str) -> list[dict[str, Any]]:
    r = system.cluster.kube.request("GET", f"/api/v1/namespaces/{system.namespace}/events",
                                    query={"fieldSelector": f"involvedObject.name={name}"})
    return list(r.get("items", []))


def wait_reported(system: System, name: str, reason: str, timeout: float) -> dict[str, Any]:
    """Wait until a FineTuneJob's conditions carry ``reason`` and a Warning Event says it too."""

    def reported() -> dict[str, Any] | None:
        obj = system.resource(FTJ, name) or {}
        conds = (obj.get("status") or {}).get("conditions") or []
        return obj if any(c.get("reason") == reason for c in conds) else None

    obj = wait_for(reported, timeout, f"{reason} in the status", interval=1.0)
    wait_for(lambda: any(e["type"] == "Warning" and e["reason"] == reason for e in events_for(system, name)),
             60, f"a Warning Event {reason}")
    return obj


def pod_of(system: System, name: str, stage: str | None = None) -> dict[str, Any]:
    """The newest pod of a FineTuneJob's GPU Job (``stage`` "prepare": of its CPU prepare Job)."""
    which = f"kubetune.dev/stage={stage}" if stage else "!kubetune.dev/stage"
    pods = system.pods(f"kubetune.dev/job-name={name},{which}")
    assert pods, f"no pod for {name}"
    return sorted(pods, key=lambda p: p["metadata"]["creationTimestamp"])[-1]


def test_the_pods_run_the_images_built_here_on_the_real_node(real_system: System, real_env: Any) -> None:
    """The chart's operator and a trainer pod: containers from the Dockerfile's images, on the
    kubelet's node, non-root, read-only root, in a namespace that enforces `restricted`."""
    ns = real_system.cluster.get(f"/api/v1/namespaces/{real_system.namespace}")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    # enforcement is live: a root pod is refused in this namespace
    bad = real_system.cluster.kubectl(
        "run", "root-pod", "-n", real_system.namespace, f"--image={real_env.images['TRAINER_IMAGE']}",
        "--restart=Never", "--overrides", json.dumps({"spec": {"securityContext": {"runAsUser": 0}}}),
        check=False)
    assert bad.returncode != 0 and "violates PodSecurity" in bad.stderr, bad.stderr

    op = real_system.cluster.get("/api/v1/namespaces/kubetune-system/pods")["items"]
    assert op, "the chart's operator pod is missing"
    assert op[0]["spec"]["nodeName"] == "kubetune-node"
    assert op[0]["spec"]["containers"][0]["image"] == real_env.images["OPERATOR_IMAGE"]
    assert op[0]["status"]["containerStatuses"][0]["ready"] is True  # readiness probe on the metrics port

    name = "in-a-container"
    real_system.cluster.apply(finetune(real_system, name, max_steps=2, save_steps=2), namespace=real_system.namespace)
    ftj = wait_phase(real_system, FTJ, name, "Succeeded", "Failed")
    assert ftj["status"]["phase"] == "Succeeded", f"{ftj['status']}\n{real_system.diagnostics()}"
    pod = pod_of(real_system, name)
    assert pod["spec"]["nodeName"] == "kubetune-node"
    container = pod["spec"]["containers"][0]
    assert container["image"] == real_env.images["TRAINER_IMAGE"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    status = pod["status"]["containerStatuses"][0]
    assert status["imageID"], status  # containerd ran it from the image it holds
    assert status["state"]["terminated"]["exitCode"] == 0
    assert re.fullmatch(r"10\.202\.0\.\d+", pod["status"]["podIP"]), pod["status"].get("podIP")
    wide = real_system.cluster.kubectl("get", "pods", "-o", "wide", "-n", real_system.namespace).stdout
    print(wide)


def test_memory_limit_kills_and_the_status_says_oomkilled(real_system: System) -> None:
    """The real memory cgroup kills the trainer (it cannot even import torch in 160Mi): the
    resource fails with reason OOMKilled and the advice, and a Warning Event says the same."""
    name = "too-little-memory"
    spec = finetune(real_system, name)
    spec["spec"]["resources"]["memory"] = "160Mi"
    spec["spec"]["backoffLimit"] = 0
    real_system.cluster.apply(spec, namespace=real_system.namespace)
    ftj = wait_phase(real_system, FTJ, name, "Failed", "Succeeded", timeout=420)  # the CPU prepare pod runs first
    failed = condition(ftj, "Failed")
    assert failed["reason"] == "OOMKilled", f"{ftj['status']}\n{real_system.diagnostics()}"
    assert "spec.resources.memory" in failed["message"]
    term = pod_of(real_system, name)["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["reason"] == "OOMKilled" and term["exitCode"] == 137, term
    events = events_for(real_system, name)
    assert any(e["type"] == "Warning" and e["reason"] == "OOMKilled" for e in events), events


def test_missing_image_is_reported_as_imagepullbackoff(real_system: System) -> None:
    """Nothing can be pulled here: a job naming an image that is not on the node stalls in
    ImagePullBackOff, and status and a Warning Event say so (the GPU is not silently held)."""
    name = "no-such-image"
    spec = finetune(real_system, name)
    spec["spec"]["image"] = "registry.invalid/kubetune/trainer:does-not-exist"
    real_system.cluster.apply(spec, namespace=real_system.namespace)

    obj = wait_reported(real_system, name, "ImagePullBackOff", 180)
    assert obj["status"]["phase"] == "Pending"
    assert "registry.invalid/kubetune/trainer:does-not-exist" in obj["status"]["message"], obj["status"]
    real_system.cluster.kubectl("delete", "finetunejob", name, "-n", real_system.namespace, "--wait=false")


@pytest.mark.timeout(2 * RUN_TIMEOUT + 300)
def test_pod_deleted_mid_run_the_retry_resumes_from_the_checkpoint(real_system: System) -> None:
    """`kubectl delete pod` of a training pod: the kubelet sends SIGTERM, the trainer saves a
    checkpoint within the grace period, the Job makes a new pod and that pod resumes from it."""
    name = "deleted-pod"
    total = 40
    real_system.cluster.apply(finetune(real_system, name, max_steps=total, save_steps=2),
                              namespace=real_system.namespace)

    def checkpointed() -> dict[str, Any] | None:
        st = (real_system.resource(FTJ, name) or {}).get("status") or {}
        if st.get("phase") in ("Succeeded", "Failed"):
            raise AssertionError(f"the run ended before the pod could be deleted: {st}")
        return st if st.get("checkpointUri") else None

    wait_for(checkpointed, RUN_TIMEOUT, "a first checkpoint", interval=0.5)
    first = pod_of(real_system, name)["metadata"]["name"]
    real_system.cluster.kubectl("delete", "pod", first, "-n", real_system.namespace, "--wait=true", timeout=180)
    done = wait_phase(real_system, FTJ, name, "Succeeded", "Failed")
    assert done["status"]["phase"] == "Succeeded", f"{done['status']}\n{real_system.diagnostics()}"
    assert done["status"]["progress"]["step"] == total
    latest = pod_of(real_system, name)
    assert latest["metadata"]["name"] != first
    log = real_system.cluster.kubectl("logs", "-n", real_system.namespace, latest["metadata"]["name"]).stdout
    m = re.search(r"resuming from step (\d+)", log)
    assert m and int(m.group(1)) >= 2, log[-3000:]


def test_services_resolve_by_name_and_route_through_kube_proxy(real_system: System, real_env: Any) -> None:
    """Cluster DNS and Services as in any cluster: from a pod (the trainer image, restricted), the
    operator's metrics Service resolves by name (CoreDNS) and answers through kube-proxy's rules;
    the API server answers at kubernetes.default."""
    script = (
        "import socket, ssl, urllib.request\n"
        "svc = 'kubetune-metrics.kubetune-system.svc.cluster.local'\n"
        "print('svc', socket.gethostbyname(svc))\n"
        "print('metrics', b'kubetune' in urllib.request.urlopen(f'http://{svc}:8080/metrics', timeout=20).read())\n"
        "ctx = ssl.create_default_context(cafile='/var/run/secrets/kubernetes.io/serviceaccount/ca.crt')\n"
        "tok = open('/var/run/secrets/kubernetes.io/serviceaccount/token').read()\n"
        "req = urllib.request.Request('https://kubernetes.default.svc/version',\n"
        "                             headers={'Authorization': 'Bearer ' + tok})\n"
        "print('api', urllib.request.urlopen(req, context=ctx, timeout=20).status)\n"
    )
    restricted = {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}}
    container = {"name": "probe", "image": real_env.images["TRAINER_IMAGE"], "imagePullPolicy": "Never",
                 "command": ["python", "-c", script],
                 "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                     "capabilities": {"drop": ["ALL"]}}}
    real_system.cluster.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "dns-probe"},
                               "spec": {"restartPolicy": "Never", "securityContext": restricted,
                                        "nodeSelector": {"kubetune.dev/node": "real"}, "containers": [container]}},
                              namespace=real_system.namespace)
    path = f"/api/v1/namespaces/{real_system.namespace}/pods/dns-probe"
    pod = wait_for(lambda: (p := real_system.cluster.get(path)) and p["status"].get("phase") in ("Succeeded", "Failed")
                   and p, 180, "the probe pod to finish")
    log = real_system.cluster.kubectl("logs", "-n", real_system.namespace, "dns-probe").stdout
    assert pod["status"]["phase"] == "Succeeded", log
    svc = real_system.cluster.get("/api/v1/namespaces/kubetune-system/services/kubetune-metrics")
    assert f"svc {svc['spec']['clusterIP']}" in log and "metrics True" in log and "api 200" in log, log


def test_more_gpus_than_the_node_has_is_reported_unschedulable(real_system: System) -> None:
    """The real node advertises 8 nvidia.com/gpu: a job asking 16 on it stays Pending with the
    scheduler's reason in status and a Warning Event, and no container starts."""
    name = "too-many-gpus"
    spec = finetune(real_system, name)
    spec["spec"]["resources"]["gpus"] = 16
    real_system.cluster.apply(spec, namespace=real_system.namespace)

    obj = wait_reported(real_system, name, "Unschedulable", 360)  # after the CPU prepare stage
    assert obj["status"]["phase"] == "Pending"
    assert "nvidia.com/gpu" in obj["status"]["message"], obj["status"]
    assert not pod_of(real_system, name).get("spec", {}).get("nodeName")
    real_system.cluster.kubectl("delete", "finetunejob", name, "-n", real_system.namespace, "--wait=false")
