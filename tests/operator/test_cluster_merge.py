"""MergeJob against a real control plane: waits for its FineTuneJob, resolves the adapter, runs."""

from __future__ import annotations

import json

import pytest
from clusterkit import (
    RUNNER,
    create,
    create_s3_secret,
    ftj_spec,
    get,
    job,
    kubelet_exit,
    kubelet_run,
    phase_is,
    support_name,
    term_message,
    wait_for,
    wait_pod,
    wait_status,
)

pytestmark = pytest.mark.integration


def _finish_training(cluster, ns, name):
    wait_for(lambda: job(cluster, ns, f"{name}-train"), 60, "training Job")
    pod = wait_pod(cluster, ns, f"{name}-train")
    kubelet_run(cluster, pod)
    kubelet_exit(cluster, pod, 0, term_message("Completed", "ok", adapterUri=f"s3://out/{name}/adapter"))


def test_merge_job_waits_for_its_finetunejob(cluster, ns, operator_proc):
    create_s3_secret(cluster, ns)
    mj = {"source": {"fineTuneJobRef": {"name": "base"}}, "output": {"uri": "s3://out/merged"},
          "resources": {"gpus": 0, "nodeSelector": dict(RUNNER)}}
    create(cluster, ns, "MergeJob", "publish", mj)
    wait_status(cluster, ns, "MergeJob", "publish", phase_is("Pending", "FineTuneJobNotFound"), 30)

    create(cluster, ns, "FineTuneJob", "base", ftj_spec())
    wait_status(cluster, ns, "MergeJob", "publish", phase_is("Pending", "WaitingForFineTuneJob"), 60)
    assert job(cluster, ns, "publish-merge") is None

    _finish_training(cluster, ns, "base")
    wait_status(cluster, ns, "FineTuneJob", "base", phase_is("Succeeded"), 60)
    merge_job = wait_for(lambda: job(cluster, ns, "publish-merge"), 90, "merge Job")
    (container,) = merge_job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["kubetune", "merge", "--spec", "/etc/kubetune/spec.json"]
    config_map = support_name(cluster, ns, "MergeJob", "publish")
    resolved = json.loads(cluster.request("GET", f"/api/v1/namespaces/{ns}/configmaps/{config_map}")
                          ["data"]["spec.json"])
    assert resolved["source"] == {"adapterUri": "s3://out/base/adapter", "baseModel": ftj_spec()["model"] |
                                  {"trustRemoteCode": False}}
    assert resolved["storage"]["secretRef"]["name"] == "s3-creds"  # defaulted from the FineTuneJob

    pod = wait_pod(cluster, ns, "publish-merge")
    kubelet_run(cluster, pod)
    kubelet_exit(cluster, pod, 0, term_message("Completed", "merged", mergedUri="s3://out/merged",
                                               verification={"maxLogitDiff": 0.001, "passed": True}))
    st = wait_status(cluster, ns, "MergeJob", "publish", phase_is("Succeeded"), 60)
    assert st["mergedUri"] == "s3://out/merged" and st["verification"]["passed"] is True


def test_finetunejob_with_merge_enabled_creates_an_owned_mergejob(cluster, ns, operator_proc):
    create_s3_secret(cluster, ns)
    create(cluster, ns, "FineTuneJob", "auto", ftj_spec(merge={"enabled": True}))
    _finish_training(cluster, ns, "auto")
    st = wait_status(cluster, ns, "FineTuneJob", "auto", lambda s: s.get("mergeJobName") == "auto-merge", 60)
    assert st["phase"] == "Succeeded"
    mj = get(cluster, ns, "MergeJob", "auto-merge")
    assert mj["metadata"]["ownerReferences"][0]["name"] == "auto"
    assert mj["spec"]["output"]["uri"] == "s3://out/run-1/merged"
    wait_for(lambda: job(cluster, ns, "auto-merge-merge"), 60, "the MergeJob's Job")
