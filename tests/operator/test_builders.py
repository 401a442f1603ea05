"""Builders: exact child manifests, security settings, secrets by reference only, names."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from kubetune_operator import builders

from kubetune import api, contract

SETTINGS = builders.Settings(trainer_image="registry.local/kubetune-trainer:1.0")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _spec(body):
    return api.FineTuneJobSpec.model_validate(body["spec"])


def _container(job):
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container


# ------------------------------------------------------------------------------------- names
@pytest.mark.parametrize("name", ["a", "demo", "x" * 57, "x" * 58, "a" * 200, "team.llama-3.2-1b." + "q" * 100])
def test_child_names_are_short_dns_labels_and_deterministic(name):
    for suffix in ("train", "merge"):
        child = builders.child_name(name, suffix)
        assert len(child) <= 63
        assert child.endswith(f"-{suffix}")
        assert child == builders.child_name(name, suffix)
        if len(f"{name}-{suffix}") <= 63:
            assert child == f"{name}-{suffix}"
        else:
            assert DNS_LABEL.match(child.replace(".", "-")), child


def test_long_names_that_share_a_prefix_get_different_children():
    a, b = "p" * 80 + "-one", "p" * 80 + "-two"
    assert builders.child_name(a, "train") != builders.child_name(b, "train")
    assert builders.label_value(a) != builders.label_value(b)
    assert len(builders.label_value(a)) <= 63


def test_label_value_keeps_short_values():
    assert builders.label_value("demo") == "demo"
    long = "a" * 100
    value = builders.label_value(long)
    assert len(value) == 63 and re.match(r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$", value)


# ------------------------------------------------------------------------------------- job
def test_job_pod_spec_exact(ftj_body):
    body = ftj_body()
    job = builders.job(body, _spec(body), SETTINGS, suspend=False)
    labels = {
        "app.kubernetes.io/name": "kubetune",
        "app.kubernetes.io/instance": "demo",
        "app.kubernetes.io/component": "trainer",
        "app.kubernetes.io/managed-by": "kubetune-operator",
        "kubetune.dev/job-name": "demo",
        "kubetune.dev/kind": "FineTuneJob",
    }
    assert job["metadata"] == {
        "name": "demo-train",
        "namespace": "team-a",
        "labels": labels,
        "annotations": {"kubetune.dev/owner": "FineTuneJob/demo"},
        "ownerReferences": [{"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "name": "demo",
                             "uid": "uid-demo", "controller": True, "blockOwnerDeletion": True}],
    }
    spec = job["spec"]
    assert {k: v for k, v in spec.items() if k not in ("template", "podFailurePolicy")} == {
        "parallelism": 1, "completions": 1, "backoffLimit": 3, "suspend": False,
    }
    pod = spec["template"]["spec"]
    assert spec["template"]["metadata"]["labels"] == labels
    assert pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == "demo-train-uiddemo"  # uid-derived: never a namesake's
    assert pod["automountServiceAccountToken"] is True
    assert pod["terminationGracePeriodSeconds"] == 300
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                                      "seccompProfile": {"type": "RuntimeDefault"}}
    c = _container(job)
    assert c["name"] == "trainer"
    assert c["image"] == "registry.local/kubetune-trainer:1.0"
    assert c["command"] == ["kubetune", "train", "--spec", "/etc/kubetune/spec.json"]
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                    "readOnlyRootFilesystem": True, "runAsNonRoot": True}
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert c["terminationMessagePath"] == "/dev/termination-log"
    assert c["resources"] == {"limits": {"nvidia.com/gpu": "1"}}
    assert c["volumeMounts"] == [
        {"name": "spec", "mountPath": "/etc/kubetune", "readOnly": True},
        {"name": "work", "mountPath": "/var/kubetune/work"},
        {"name": "cache", "mountPath": "/var/kubetune/cache"},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    assert pod["volumes"] == [
        {"name": "spec", "configMap": {"name": "demo-train-uiddemo",
                                       "items": [{"key": "spec.json", "path": "spec.json"}]}},
        {"name": "work", "emptyDir": {}},
        {"name": "cache", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}},
    ]
    env = {e["name"]: e for e in c["env"]}
    assert {k: v["value"] for k, v in env.items() if "value" in v} == {
        contract.ENV_SPEC_FILE: "/etc/kubetune/spec.json",
        contract.ENV_KIND: "FineTuneJob",
        contract.ENV_NAME: "demo",
        contract.ENV_NAMESPACE: "team-a",
        contract.ENV_UID: "uid-demo",
        contract.ENV_TERMINATION_LOG: "/dev/termination-log",
        contract.ENV_WORK_DIR: "/var/kubetune/work",
        "HF_HOME": "/var/kubetune/cache",
        "HOME": "/tmp",
        "PYTHONUNBUFFERED": "1",
    }
    for name in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
        assert name not in pod


def test_pod_failure_policy_permanent_codes_fail_preemption_ignored(ftj_body):
    body = ftj_body()
    policy = builders.job(body, _spec(body), SETTINGS, suspend=False)["spec"]["podFailurePolicy"]
    assert policy == {"rules": [
        {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In",
                                              "values": [2, 3, 5, 6, 8, 9, 10, 11]}},
        {"action": "Ignore", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [7]}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]}
    assert contract.EXIT_STORAGE not in policy["rules"][0]["onExitCodes"]["values"]  # storage errors are retried


def test_secrets_are_referenced_never_inlined(ftj_body):
    body = ftj_body(
        tracking={"wandb": {"project": "p", "secretRef": {"name": "wandb", "key": "api-key"}}},
        dataset={"source": "deeplake", "uri": "hub://org/ds", "secretRef": {"name": "dl", "key": "tok"}},
        storage={"secretRef": {"name": "s3-creds", "accessKeyIdKey": "id", "secretAccessKeyKey": "secret"}},
    )
    spec = _spec(body)
    job = builders.job(body, spec, SETTINGS, suspend=False)
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in _container(job)["env"] if "valueFrom" in e}
    assert refs == {
        "AWS_ACCESS_KEY_ID": {"name": "s3-creds", "key": "id"},
        "AWS_SECRET_ACCESS_KEY": {"name": "s3-creds", "key": "secret"},
        "WANDB_API_KEY": {"name": "wandb", "key": "api-key"},
        "KUBETUNE_DATASET_TOKEN": {"name": "dl", "key": "tok"},
        "HF_TOKEN": {"name": "hf-token", "key": "token"},
    }
    for e in _container(job)["env"]:
        assert ("value" in e) != ("valueFrom" in e)
    cm = builders.config_map(body, spec)
    assert set(cm["data"]) == {"spec.json"}
    assert "valueFrom" not in cm["data"]["spec.json"]


def test_config_map_holds_the_resolved_camelcase_spec(ftj_body):
    body = ftj_body()
    cm = builders.config_map(body, _spec(body))
    assert cm["metadata"]["name"] == "demo-train-uiddemo"
    assert cm["metadata"]["ownerReferences"][0]["uid"] == "uid-demo"
    doc = json.loads(cm["data"][contract.SPEC_KEY])
    assert doc["training"]["maxSteps"] == 10
    assert doc["lora"]["targetModules"] == ["all-linear"]  # defaults resolved
    assert api.FineTuneJobSpec.model_validate(doc) == _spec(body)  # the trainer reads the same spec


def test_resources_placement_deadline_ttl_suspend_queue(ftj_body):
    body = ftj_body(
        resources={"gpus": 2, "gpuResource": "amd.com/gpu", "cpu": "8", "memory": "64Gi", "shmSize": "8Gi",
                   "nodeSelector": {"pool": "h100"},
                   "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                   "affinity": {"nodeAffinity": {"x": 1}}, "priorityClassName": "high"},
        activeDeadlineSeconds=3600, ttlSecondsAfterFinished=60, backoffLimit=5, queueName="team-a-queue",
        image="my/own:tag",
    )
    spec = _spec(body)
    assert builders.initial_suspend(spec) is True  # Kueue admits it
    job = builders.job(body, spec, SETTINGS, suspend=builders.initial_suspend(spec))
    js, pod = job["spec"], job["spec"]["template"]["spec"]
    assert (js["activeDeadlineSeconds"], js["backoffLimit"], js["suspend"]) == (3600, 5, True)
    assert "ttlSecondsAfterFinished" not in js  # set only once the end is recorded (ttl_patch)
    assert builders.ttl_patch(job, spec) == {"spec": {"ttlSecondsAfterFinished": 60}}
    assert builders.ttl_patch({**job, "spec": {**js, "ttlSecondsAfterFinished": 60}}, spec) is None
    assert builders.ttl_patch(None, spec) is None
    assert job["metadata"]["labels"][contract.LABEL_QUEUE] == "team-a-queue"
    assert _container(job)["resources"] == {"limits": {"amd.com/gpu": "2", "cpu": "8", "memory": "64Gi"},
                                            "requests": {"cpu": "8", "memory": "64Gi"}}
    assert _container(job)["image"] == "my/own:tag"
    assert pod["nodeSelector"] == {"pool": "h100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["affinity"] == {"nodeAffinity": {"x": 1}}
    assert pod["priorityClassName"] == "high"
    assert pod["volumes"][-1] == {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}


def test_cpu_only_job_has_no_gpu_limit(ftj_body):
    body = ftj_body(resources={"gpus": 0})
    assert _container(builders.job(body, _spec(body), SETTINGS, False))["resources"] == {}
    assert builders.initial_suspend(_spec(body)) is False
    assert builders.initial_suspend(_spec(ftj_body(suspend=True))) is True


# ------------------------------------------------------------------------------------- rbac
def test_progress_channel_role_is_least_privilege(ftj_body):
    body = ftj_body()
    sa, role, rb = builders.service_account(body), builders.role(body), builders.role_binding(body)
    assert sa["metadata"]["name"] == role["metadata"]["name"] == rb["metadata"]["name"] == "demo-train-uiddemo"
    assert role["rules"] == [{"apiGroups": ["kubetune.dev"], "resources": ["finetunejobs/status"],
                              "resourceNames": ["demo"], "verbs": ["get", "patch"]}]
    assert rb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "demo-train-uiddemo"}
    assert rb["subjects"] == [{"kind": "ServiceAccount", "name": "demo-train-uiddemo", "namespace": "team-a"}]
    for child in (sa, role, rb):
        assert child["metadata"]["ownerReferences"][0]["controller"] is True


# ------------------------------------------------------------------------------------- merge
def test_merge_job_created_by_finetunejob(ftj_body):
    body = ftj_body(merge={"enabled": True, "dtype": "float16"}, resources={"gpus": 1, "memory": "40Gi"})
    mj = builders.merge_job(body, _spec(body))
    assert mj["metadata"]["name"] == "demo-merge"
    assert mj["metadata"]["ownerReferences"][0]["kind"] == "FineTuneJob"
    spec = api.MergeJobSpec.model_validate(mj["spec"])
    assert spec.source.fine_tune_job_ref == api.LocalObjectRef(name="demo")
    assert spec.dtype == "float16"
    assert spec.output.uri == "s3://out/run-1/merged"
    assert spec.storage == _spec(body).storage
    assert (spec.resources.gpus, spec.resources.memory) == (0, "40Gi")
    explicit = ftj_body(merge={"enabled": True, "output": {"uri": "s3://pub/model"}})
    assert builders.merge_job(explicit, _spec(explicit))["spec"]["output"]["uri"] == "s3://pub/model"


def test_resolve_merge_spec_fills_adapter_base_and_storage(ftj_body, mj_body):
    ftj = ftj_body()
    ftj["status"] = {"phase": "Succeeded", "adapterUri": "s3://out/run-1/adapter"}
    mj = api.MergeJobSpec.model_validate(mj_body()["spec"])
    resolved = builders.resolve_merge_spec(mj, ftj)
    assert resolved.source.fine_tune_job_ref is None
    assert resolved.source.adapter_uri == "s3://out/run-1/adapter"
    assert resolved.source.base_model == _spec(ftj).model
    assert resolved.storage == _spec(ftj).storage
    api.MergeJobSpec.model_validate(resolved.to_wire())  # valid for the merge container

    own = api.MergeJobSpec.model_validate(mj_body(storage={"region": "eu-west-1"},
                                                  source={"fineTuneJobRef": {"name": "demo"},
                                                          "baseModel": {"name": "org/base"}})["spec"])
    resolved = builders.resolve_merge_spec(own, ftj)
    assert resolved.storage.region == "eu-west-1" and resolved.source.base_model.name == "org/base"


def test_merge_job_pod_runs_merge_with_base_model_token(mj_body, ftj_body):
    ftj = ftj_body()
    ftj["status"] = {"adapterUri": "s3://out/run-1/adapter"}
    body = mj_body()
    resolved = builders.resolve_merge_spec(api.MergeJobSpec.model_validate(body["spec"]), ftj)
    job = builders.job(body, resolved, SETTINGS, suspend=False)
    c = _container(job)
    assert job["metadata"]["name"] == "demo-merged-merge"
    assert c["name"] == "merge" and c["command"] == ["kubetune", "merge", "--spec", "/etc/kubetune/spec.json"]
    assert c["resources"] == {}  # MergeJob default: CPU
    assert job["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["containerName"] == "merge"
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"] if "valueFrom" in e}
    assert refs == {"AWS_ACCESS_KEY_ID": "s3-creds", "AWS_SECRET_ACCESS_KEY": "s3-creds", "HF_TOKEN": "hf-token"}
    assert builders.role(body)["rules"][0]["resources"] == ["mergejobs/status"]


def test_examples_build(tmp_path):
    """The shipped examples turn into valid-looking children."""
    from pathlib import Path

    doc = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "finetune.yaml").read_text())
    body = {**doc, "metadata": {**doc["metadata"], "namespace": "ns", "uid": "u"}}
    job = builders.job(body, _spec(body), SETTINGS, suspend=False)
    assert job["metadata"]["name"] == "llama-qlora-train"
    assert builders.ttl_patch(job, _spec(body)) == {"spec": {"ttlSecondsAfterFinished": 86400}}


def test_queue_and_priority_class_reach_the_job_and_the_merge_inherits_them(ftj_body):
    body = ftj_body(queueName="team", workloadPriorityClassName="high", merge={"enabled": True},
                    pod={"serviceAccountName": "trainer-identity"}, modelCache={"claimName": "hf-models"})
    spec = _spec(body)
    labels = builders.job(body, spec, builders.Settings(), suspend=True)["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/queue-name"] == "team" and labels["kueue.x-k8s.io/priority-class"] == "high"
    merge = api.MergeJobSpec.model_validate(builders.merge_job(body, spec)["spec"])
    assert (merge.queue_name, merge.workload_priority_class_name) == ("team", "high")
    assert merge.pod.service_account_name == "trainer-identity" and merge.model_cache.claim_name == "hf-models"
    assert builders.initial_suspend(merge)  # a queued MergeJob's Job is created suspended, for Kueue
