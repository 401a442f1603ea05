"""The two multi-rank shapes of a FineTuneJob (docs/distributed.md), as manifests and as status:
``gpus: 2`` (one pod, torchrun with 2 ranks) and ``nodes: 2`` (an Indexed Job of 2 pods under a
headless Service). Pure: no cluster (the real API server and kubelet run them in
tests/e2e/test_distributed_e2e.py)."""

from __future__ import annotations

from typing import Any

from kobjects import jcond, job_dict, pod_dict, term_msg
from kubetune_operator import builders, status

from kubetune import api, contract

SETTINGS = builders.Settings(trainer_image="img:1")


def build(body: dict[str, Any]) -> dict[str, Any]:
    return builders.job(body, api.FineTuneJobSpec.model_validate(body["spec"]), SETTINGS, suspend=False)


def env_of(job: dict[str, Any]) -> dict[str, Any]:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def with_resources(ftj_body: Any, **resources: Any) -> dict[str, Any]:
    body = ftj_body()
    body["spec"]["resources"] = {**body["spec"].get("resources", {}), **resources}
    return body


def test_one_rank_jobs_have_no_torchrun_shape(ftj_body: Any) -> None:
    for resources in ({"gpus": 1}, {"gpus": 0}):
        job = build(with_resources(ftj_body, **resources))
        assert not {k for k in env_of(job) if k in (contract.ENV_NPROC_PER_NODE, contract.ENV_NNODES)}
        assert job["spec"]["parallelism"] == job["spec"]["completions"] == 1
        assert "completionMode" not in job["spec"] and "subdomain" not in job["spec"]["template"]["spec"]
    assert not builders.needs_service(api.FineTuneJobSpec.model_validate(ftj_body()["spec"]))


def test_two_gpus_one_pod_two_ranks(ftj_body: Any) -> None:
    body = with_resources(ftj_body, gpus=2)
    job = build(body)
    env = env_of(job)
    assert (env[contract.ENV_NPROC_PER_NODE], env[contract.ENV_NNODES]) == ("2", "1")
    assert contract.ENV_RDZV_ENDPOINT not in env and contract.ENV_NODE_RANK not in env
    assert job["spec"]["parallelism"] == job["spec"]["completions"] == 1 and "completionMode" not in job["spec"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert container["command"] == ["kubetune", "train", "--spec", contract.SPEC_FILE]  # torchrun starts in it
    assert not builders.needs_service(api.FineTuneJobSpec.model_validate(body["spec"]))


def test_two_nodes_indexed_job_under_a_headless_service(ftj_body: Any) -> None:
    body = with_resources(ftj_body, gpus=4, nodes=2)
    spec = api.FineTuneJobSpec.model_validate(body["spec"])
    job = build(body)
    js, pod = job["spec"], job["spec"]["template"]["spec"]
    assert (js["completionMode"], js["completions"], js["parallelism"]) == ("Indexed", 2, 2)
    assert js["podReplacementPolicy"] == "Failed"  # a replacement never overlaps its predecessor's hostname
    assert js["backoffLimit"] == spec.backoff_limit * 2
    assert js["podFailurePolicy"] == builders.pod_failure_policy("trainer")  # permanent codes end the group
    service = builders.rendezvous_service(body)
    assert pod["subdomain"] == service["metadata"]["name"] == builders.support_name(body)
    env = env_of(job)
    assert (env[contract.ENV_NPROC_PER_NODE], env[contract.ENV_NNODES]) == ("4", "2")
    assert env[contract.ENV_NODE_RANK] == {"fieldRef": {
        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
    assert env[contract.ENV_RDZV_ENDPOINT] == f"demo-train-0.{service['metadata']['name']}:29400"
    assert env[contract.ENV_RDZV_ID] == body["metadata"]["uid"]
    assert pod["containers"][0]["ports"] == [{"name": "rdzv", "containerPort": 29400, "protocol": "TCP"}]

    # the Service: headless, not-ready addresses published, selects exactly this job's pods, owned by it
    ss = service["spec"]
    assert ss["clusterIP"] == "None" and ss["publishNotReadyAddresses"] is True
    assert ss["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    assert ss["ports"] == [{"name": "rdzv", "port": 29400, "targetPort": 29400, "protocol": "TCP"}]
    assert service["metadata"]["ownerReferences"] == [builders.owner_reference(body)]
    assert builders.needs_service(spec)


def test_service_name_is_a_dns_1035_label_for_any_resource_name(ftj_body: Any) -> None:
    import re

    for name in ("demo", "7b-run", "0" * 60, "a" * 250):
        body = with_resources(ftj_body, nodes=2)
        body["metadata"]["name"] = name
        svc = builders.rendezvous_service_name(body)
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", svc) and len(svc) <= 63, (name, svc)
        assert body["metadata"]["uid"].replace("-", "")[:8] in svc  # uid-derived: never a namesake's


def test_the_auto_merge_stays_one_pod(ftj_body: Any) -> None:
    body = with_resources(ftj_body, gpus=2, nodes=2)
    merge = builders.merge_job(body, api.FineTuneJobSpec.model_validate(body["spec"]))
    assert api.MergeJobSpec.model_validate(merge["spec"]).resources.nodes == 1


def indexed_job(**job_status: Any) -> dict[str, Any]:
    job = job_dict(**job_status)
    job["spec"].update(parallelism=2, completions=2, completionMode="Indexed")
    return job


def ended(name: str, phase: str, created: str, code: int, message: str) -> dict[str, Any]:
    return pod_dict(name, phase, created, terminated={"exitCode": code, "message": message})


def test_status_takes_the_result_of_the_pod_with_rank_zero_and_counts_group_attempts(ftj_body: Any) -> None:
    rank0 = ended("demo-train-0-abc", "Succeeded", "2026-01-01T00:00:00Z", 0,
                  term_msg("Completed", "FineTuneJob finished in 9s", adapterUri="s3://out/run/adapter"))
    rank1 = ended("demo-train-1-def", "Succeeded", "2026-01-01T00:00:01Z", 0,  # newer, and no result
                  term_msg("Completed", "FineTuneJob finished in 9s"))
    job = indexed_job(conditions=[jcond("Complete")], succeeded=2)
    st = status.derive("FineTuneJob", ftj_body(), job, [rank0, rank1], "2026-01-01T02:00:00Z")
    assert st["phase"] == "Succeeded" and st["adapterUri"] == "s3://out/run/adapter"
    assert st["attempts"] == 1  # two pods, one attempt of the group

    # a lost pod: 4 pods over time are 2 attempts of the group
    assert status.attempts(indexed_job(succeeded=2, failed=2), []) == 2
    assert status.attempts(job_dict(succeeded=1, failed=2), []) == 3  # one pod: unchanged
