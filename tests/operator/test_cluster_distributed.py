"""A multi-node FineTuneJob against the real control plane, with the chart's RBAC: the operator
creates the headless Service and an Indexed Job the API server accepts; the Job controller makes
one pod per index with its hostname under the Service; the EndpointSlice controller publishes
those names (what CoreDNS answers, before the pods are ready); the result comes from pod 0 and the
two pods are one attempt. (Real pods meeting over that DNS: tests/e2e/test_distributed_e2e.py.)"""

from __future__ import annotations

from typing import Any

import pytest
from clusterkit import (
    create,
    create_s3_secret,
    ftj_spec,
    job,
    kubelet_exit,
    kubelet_run,
    phase_is,
    pods,
    support_name,
    term_message,
    wait_for,
    wait_status,
)

pytestmark = pytest.mark.integration
INDEX = "batch.kubernetes.io/job-completion-index"


def test_two_nodes_service_indexed_job_and_rank_zero_result(cluster: Any, ns: str, operator_proc: Any) -> None:
    create_s3_secret(cluster, ns)
    create(cluster, ns, "FineTuneJob", "multi", ftj_spec(resources={"gpus": 1, "nodes": 2, "nodeSelector":
                                                                    {"kubetune.dev/runner": "true"}}))
    j = wait_for(lambda: job(cluster, ns, "multi-train"), 60, "Job multi-train")
    service = support_name(cluster, ns, "FineTuneJob", "multi")
    assert (j["spec"]["completionMode"], j["spec"]["completions"], j["spec"]["parallelism"]) == ("Indexed", 2, 2)
    assert j["spec"]["template"]["spec"]["subdomain"] == service
    svc = cluster.request("GET", f"/api/v1/namespaces/{ns}/services/{service}")
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["metadata"]["ownerReferences"][0]["name"] == "multi"

    both = wait_for(lambda: (ps := [p for p in pods(cluster, ns, "multi-train") if p["spec"].get("nodeName")])
                    and len(ps) == 2 and ps, 60, "two pods scheduled")
    by_index = {p["metadata"]["annotations"][INDEX]: p for p in both}
    assert sorted(by_index) == ["0", "1"]
    for index, pod in by_index.items():
        assert pod["spec"]["hostname"] == f"multi-train-{index}" and pod["spec"]["subdomain"] == service
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        assert env["KUBETUNE_RDZV_ENDPOINT"]["value"] == f"multi-train-0.{service}:29400"
        kubelet_run(cluster, pod)
        ip = f"10.244.1.1{index}"
        cluster.request("PATCH", f"/api/v1/namespaces/{ns}/pods/{pod['metadata']['name']}/status",
                        {"status": {"podIP": ip, "podIPs": [{"ip": ip}]}},
                        content_type="application/merge-patch+json")

    def published() -> dict[str, str] | None:
        slices = cluster.request("GET", f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices"
                                        f"?labelSelector=kubernetes.io%2Fservice-name%3D{service}")["items"]
        names = {e.get("hostname"): e["addresses"][0] for s in slices for e in s.get("endpoints") or []}
        return names if {"multi-train-0", "multi-train-1"} <= set(names) else None

    names = wait_for(published, 60, "both pods' names in the Service's EndpointSlice")
    assert names == {"multi-train-0": "10.244.1.10", "multi-train-1": "10.244.1.11"}
    wait_status(cluster, ns, "FineTuneJob", "multi", phase_is("Running"), 30)

    kubelet_exit(cluster, by_index["1"], 0, term_message("Completed", "FineTuneJob finished in 9s"))
    kubelet_exit(cluster, by_index["0"], 0, term_message("Completed", "FineTuneJob finished in 9s",
                                                         adapterUri="s3://out/run-1/adapter"))
    st = wait_status(cluster, ns, "FineTuneJob", "multi", phase_is("Succeeded"), 60)
    assert st["adapterUri"] == "s3://out/run-1/adapter" and st["attempts"] == 1
