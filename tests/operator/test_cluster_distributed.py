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
    get,
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
from kobjects import FTJ_SPEC, make_body
from kubetune_operator import builders

from kubetune import api

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
        # one IP per pod from the start: a second patch raced the EndpointSlice controller, which
        # could publish the first IP (CI on 4489f1b)
        kubelet_run(cluster, pod, ip=f"10.244.1.1{index}")

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


def test_the_api_server_accepts_the_indexed_job_and_service_for_any_name(cluster: Any, ns: str) -> None:
    """Names a custom resource may have but a Service or pod hostname may not (dots, a digit first,
    long), with the most pods: the API server (dry run) accepts the Job and Service as built, and
    defaults nothing away (podReplacementPolicy Failed stays, as the pod failure policy requires)."""
    settings = builders.Settings(trainer_image="img:1")
    for name in ("llama.v2", "7b.run", "a" * 56, "b" * 60, "x.y" * 80):
        for nodes in (2, 64):
            body = make_body("FineTuneJob", {**FTJ_SPEC, "resources": {"gpus": 1, "nodes": nodes}}, name=name,
                             namespace=ns)
            body["metadata"]["uid"] = "0d4f5e6a-1111-2222-3333-444455556666"
            manifest = builders.job(body, api.FineTuneJobSpec.model_validate(body["spec"]), settings, suspend=True)
            service = builders.rendezvous_service(body)
            for obj in (manifest, service):
                obj["metadata"].pop("ownerReferences")  # the owner does not exist: a dry run checks the rest
            got = cluster.request("POST", f"/apis/batch/v1/namespaces/{ns}/jobs?dryRun=All", manifest)
            assert (got["spec"]["completionMode"], got["spec"]["podReplacementPolicy"]) == ("Indexed", "Failed")
            cluster.request("POST", f"/api/v1/namespaces/{ns}/services?dryRun=All", service)


def test_a_dotted_name_runs_on_two_nodes(cluster: Any, ns: str, operator_proc: Any) -> None:
    """``llama.v2``: a fine FineTuneJob name, not a Service name nor a hostname. The operator names
    the Job and Service so that both pods get their hostnames under the Service."""
    create_s3_secret(cluster, ns)
    create(cluster, ns, "FineTuneJob", "llama.v2", ftj_spec(resources={"gpus": 1, "nodes": 2, "nodeSelector":
                                                                       {"kubetune.dev/runner": "true"}}))
    body = get(cluster, ns, "FineTuneJob", "llama.v2")
    name, service = builders.job_name("FineTuneJob", "llama.v2", 2), builders.rendezvous_service_name(body)
    assert "." not in name + service
    wait_for(lambda: job(cluster, ns, name), 60, f"Job {name}")
    assert cluster.request("GET", f"/api/v1/namespaces/{ns}/services/{service}")["spec"]["clusterIP"] == "None"
    both = wait_for(lambda: len(ps := pods(cluster, ns, name)) == 2 and ps, 60, "two pods")
    assert sorted((p["spec"]["hostname"], p["spec"]["subdomain"]) for p in both) == \
        [(f"{name}-0", service), (f"{name}-1", service)]
    st = wait_status(cluster, ns, "FineTuneJob", "llama.v2", lambda s: s.get("jobName") == name, 30)
    assert st["phase"] in ("Pending", "Running")
