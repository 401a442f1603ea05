"""The two multi-rank shapes of a FineTuneJob (docs/distributed.md), as manifests and as status:
``gpus: 2`` (one pod, torchrun with 2 ranks) and ``nodes: 2`` (an Indexed Job of 2 pods under a
headless Service). Pure: no cluster (the real API server and kubelet run them in
tests/e2e/test_distributed_e2e.py)."""

from __future__ import annotations

import re
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


NAMES = ("demo", "7b-run", "llama.v2", "a.b.c-0", "0" * 60, "a" * 55, "a" * 56, "a" * 57, "x.y" * 80, "a" * 250)
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DNS_1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def test_service_name_is_a_dns_1035_label_for_any_resource_name(ftj_body: Any) -> None:
    for name in NAMES:  # custom resources may have dots in their names; Services and subdomains may not
        body = with_resources(ftj_body, nodes=2)
        body["metadata"]["name"] = name
        svc = builders.rendezvous_service_name(body)
        assert DNS_1035.fullmatch(svc) and len(svc) <= 63, (name, svc)
        assert body["metadata"]["uid"].replace("-", "")[:8] in svc  # uid-derived: never a namesake's
    body = with_resources(ftj_body, nodes=2)
    assert builders.rendezvous_service_name(body) == builders.support_name(body)  # where that is a label


def test_indexed_job_name_leaves_room_for_the_pod_hostnames(ftj_body: Any) -> None:
    """The API server wants ``<job>-<last index>`` to be a DNS label (the pods' hostnames)."""
    for name in NAMES:
        for nodes in (2, 10, 11, 64):
            body = with_resources(ftj_body, nodes=nodes)
            body["metadata"]["name"] = name
            job = build(body)
            job_name = job["metadata"]["name"]
            assert job_name == builders.job_name("FineTuneJob", name, nodes)
            last_host = f"{job_name}-{nodes - 1}"
            assert DNS_1123_LABEL.fullmatch(last_host) and len(last_host) <= 63, (name, nodes, last_host)
            service = builders.rendezvous_service_name(body)
            assert job["spec"]["template"]["spec"]["subdomain"] == service
            assert env_of(job)[contract.ENV_RDZV_ENDPOINT] == f"{job_name}-0.{service}:29400"
    assert builders.job_name("FineTuneJob", "demo", 2) == "demo-train"  # most names: what users look for
    assert builders.job_name("FineTuneJob", "a" * 50, 64) == "a" * 50 + "-train"
    # two names that differ in a dot only never share a Job
    assert builders.job_name("FineTuneJob", "llama.v2", 2) != builders.job_name("FineTuneJob", "llama-v2", 2)
    # one pod: the names are as before (an upgraded operator adopts its Jobs)
    for name in NAMES:
        body = ftj_body(name=name)
        assert build(body)["metadata"]["name"] == builders.job_name("FineTuneJob", name) == \
            builders.child_name(name, "train")


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


def indexed(pod: dict[str, Any], index: int) -> dict[str, Any]:
    pod["metadata"]["annotations"] = {contract.COMPLETION_INDEX_ANNOTATION: str(index)}
    return pod


def test_status_result_and_message_come_from_pod_zero(ftj_body: Any) -> None:
    # both pods carry a result (say, an older trainer image): index 0's wins even when older
    rank0 = indexed(ended("demo-train-0-abc", "Succeeded", "2026-01-01T00:00:00Z", 0,
                          term_msg("Completed", "rank 0 finished", adapterUri="s3://out/run/adapter")), 0)
    rank1 = indexed(ended("demo-train-1-def", "Succeeded", "2026-01-01T00:00:05Z", 0,
                          term_msg("Completed", "rank 1 finished", adapterUri="s3://elsewhere")), 1)
    job = indexed_job(conditions=[jcond("Complete")], succeeded=2)
    st = status.derive("FineTuneJob", ftj_body(), job, [rank1, rank0], "2026-01-01T02:00:00Z")
    assert st["adapterUri"] == "s3://out/run/adapter" and st["message"] == "rank 0 finished"
    # no result anywhere: pod 0's message all the same
    rank1 = indexed(ended("demo-train-1-def", "Succeeded", "2026-01-01T00:00:05Z", 0,
                          term_msg("Completed", "rank 1 finished")), 1)
    rank0 = indexed(ended("demo-train-0-abc", "Succeeded", "2026-01-01T00:00:00Z", 0,
                          term_msg("Completed", "rank 0 finished")), 0)
    st = status.derive("FineTuneJob", ftj_body(), job, [rank0, rank1], "2026-01-01T02:00:00Z")
    assert st["message"] == "rank 0 finished" and "adapterUri" not in st


def test_a_permanent_failure_on_any_pod_names_the_reason(ftj_body: Any) -> None:
    """Pod 1 exits 3 (InvalidDataset): the pod failure policy fails the Job and the Job controller
    stops pod 0, which saves a checkpoint and exits 7 later. The reason is pod 1's, whichever pod
    sorts last."""
    for first, second in (("demo-train-0-abc", "demo-train-1-def"), ("demo-train-1-def", "demo-train-0-abc")):
        bad = indexed(ended(first, "Failed", "2026-01-01T00:00:00Z", contract.EXIT_INVALID_DATASET,
                            term_msg("InvalidDataset", "rank 1: row 7 has no text")), int(first[11]))
        stopped = indexed(ended(second, "Failed", "2026-01-01T00:00:00Z", contract.EXIT_PREEMPTED,
                                term_msg("Preempted", "rank 0: stopped at step 3")), int(second[11]))
        job = indexed_job(conditions=[jcond("Failed", "PodFailurePolicy", "Container trainer ... FailJob rule")],
                          failed=2)
        st = status.derive("FineTuneJob", ftj_body(), job, [bad, stopped], "2026-01-01T02:00:00Z")
        failed = next(c for c in st["conditions"] if c["type"] == "Failed")
        assert (st["phase"], failed["reason"], st["message"]) == ("Failed", "InvalidDataset",
                                                                  "rank 1: row 7 has no text")


def test_backoff_limit_counts_failed_pods_of_a_group(ftj_body: Any) -> None:
    oom = {"exitCode": 137, "reason": "OOMKilled"}
    pods = [indexed(pod_dict(f"demo-train-{i}-x{n}", "Failed", f"2026-01-01T00:0{n}:00Z", terminated=oom), i)
            for n in range(2) for i in range(2)]
    job = indexed_job(conditions=[jcond("Failed", "BackoffLimitExceeded", "Job has reached the backoff limit")],
                      failed=4)
    st = status.derive("FineTuneJob", ftj_body(), job, pods, "2026-01-01T02:00:00Z")
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "OOMKilled" and "after 4 failed pods" in st["message"] and st["attempts"] == 2
