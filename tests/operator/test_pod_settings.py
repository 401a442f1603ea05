"""spec.pod and the operator's pod defaults (issue #15, part 1), as manifests: the platform's
defaults first, each job's own on top; what the operator owns stays the operator's; a named
ServiceAccount (workload identity) runs the pod and gets the progress channel's RoleBinding."""

from __future__ import annotations

from typing import Any

import pytest
from kubetune_operator import builders, validation
from pydantic import ValidationError

from kubetune import api

DEFAULTS = api.PodSettings.model_validate({
    "imagePullSecrets": ["registry-creds"],
    "annotations": {"sidecar.istio.io/inject": "false", "team": "platform"},
    "labels": {"cost-center": "ml"},
    "runtimeClassName": "nvidia",
    "env": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}, {"name": "NO_PROXY", "value": "minio"}],
    "volumes": [{"name": "ca", "configMap": {"name": "corp-ca"}}],
    "volumeMounts": [{"name": "ca", "mountPath": "/etc/corp-ca", "readOnly": True}],
})


def build(body: dict[str, Any], settings: builders.Settings) -> dict[str, Any]:
    return builders.job(body, api.FineTuneJobSpec.model_validate(body["spec"]), settings, suspend=False)


def with_pod(ftj_body: Any, pod: dict[str, Any] | None) -> dict[str, Any]:
    body = ftj_body()
    if pod is not None:
        body["spec"]["pod"] = pod
    return body


def test_defaults_then_the_jobs_own(ftj_body: Any) -> None:
    own = {"imagePullSecrets": ["team-creds", "registry-creds"], "annotations": {"team": "nlp"},
           "labels": {"kubetune-user": "ana"}, "serviceAccountName": "trainer-identity", "runAsUser": 1001,
           "runAsGroup": 2000, "env": [{"name": "NO_PROXY", "value": "minio,wandb"}, {"name": "HF_HOME",
                                                                                       "value": "/models"}],
           "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "hf-cache"}}],
           "volumeMounts": [{"name": "models", "mountPath": "/models"}]}
    job = build(with_pod(ftj_body, own), builders.Settings(pod_defaults=DEFAULTS))
    template = job["spec"]["template"]
    pod, meta = template["spec"], template["metadata"]
    assert pod["imagePullSecrets"] == [{"name": "registry-creds"}, {"name": "team-creds"}]
    assert meta["annotations"]["team"] == "nlp" and meta["annotations"]["sidecar.istio.io/inject"] == "false"
    assert meta["annotations"]["kubetune.dev/owner"] == "FineTuneJob/demo"  # the operator's stays
    assert meta["labels"]["cost-center"] == "ml" and meta["labels"]["kubetune-user"] == "ana"
    assert meta["labels"]["kubetune.dev/job-name"] == "demo"
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["serviceAccountName"] == "trainer-identity"
    assert pod["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"},
                                      "runAsUser": 1001, "runAsGroup": 2000, "fsGroup": 2000}
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["HTTPS_PROXY"] == "http://proxy:3128" and env["NO_PROXY"] == "minio,wandb"
    assert env["HF_HOME"] == "/models"  # replaces the operator's, once
    assert [e["name"] for e in container["env"]].count("HF_HOME") == 1
    assert env["KUBETUNE_UID"] == "uid-demo"  # the contract is untouched
    assert {v["name"] for v in pod["volumes"]} >= {"spec", "work", "ca", "models"}
    assert {"name": "models", "persistentVolumeClaim": {"claimName": "hf-cache"}} in pod["volumes"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/etc/corp-ca"] == {"name": "ca", "mountPath": "/etc/corp-ca", "readOnly": True}
    assert "/var/kubetune/work" in mounts and "/models" in mounts


def test_no_settings_is_todays_pod(ftj_body: Any) -> None:
    pod = build(ftj_body(), builders.Settings())["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == builders.support_name(ftj_body())
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["fsGroup"] == 1000
    assert "imagePullSecrets" not in pod and "runtimeClassName" not in pod


def test_a_platform_that_assigns_the_uid(ftj_body: Any) -> None:
    pod = build(ftj_body(), builders.Settings(run_as_user=None))["spec"]["template"]["spec"]
    assert pod["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}


def test_the_progress_channel_follows_the_pods_service_account(ftj_body: Any) -> None:
    body = with_pod(ftj_body, {"serviceAccountName": "trainer-identity"})
    binding = builders.role_binding(body, builders.Settings())
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "trainer-identity", "namespace": "team-a"}]
    assert binding["roleRef"]["name"] == builders.support_name(body)  # the job's own Role: its status only
    default_sa = builders.Settings(pod_defaults=api.PodSettings(serviceAccountName="ml-workloads"))
    assert builders.role_binding(ftj_body(), default_sa)["subjects"][0]["name"] == "ml-workloads"
    assert builders.role_binding(ftj_body())["subjects"][0]["name"] == builders.support_name(ftj_body())


def test_a_missing_service_account_waits_with_its_name() -> None:
    assert validation.check_service_account("trainer-identity", True) is None
    verdict = validation.check_service_account("trainer-identity", False)
    assert (verdict.phase, verdict.reason) == ("Pending", "ServiceAccountNotFound")
    assert "trainer-identity" in verdict.message


@pytest.mark.parametrize("pod,message", [
    ({"env": [{"name": "KUBETUNE_UID", "value": "x"}]}, "KUBETUNE_* variables are the operator's"),
    ({"labels": {"app.kubernetes.io/name": "x"}}, "may not use the prefixes"),
    ({"volumes": [{"name": "tmp", "emptyDir": {}}]}, "may not be named"),
    ({"volumeMounts": [{"name": "x", "mountPath": "/etc/kubetune"}]}, "may not mount over"),
])
def test_what_the_operator_owns_is_refused(pod: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("*", r"\*")):
        api.PodSettings.model_validate(pod)


def test_model_cache_mounts_the_claim_from_the_spec_or_the_operator(ftj_body: Any) -> None:
    from kubetune import contract

    def pod_of(body: dict[str, Any], settings: builders.Settings) -> dict[str, Any]:
        return build(body, settings)["spec"]["template"]["spec"]

    body = ftj_body()
    body["spec"]["modelCache"] = {"claimName": "hf-models"}
    for pod in (pod_of(body, builders.Settings(model_cache_claim="other")),
                pod_of(ftj_body(), builders.Settings(model_cache_claim="hf-models"))):
        assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": "hf-models"}} in pod["volumes"]
        (container,) = pod["containers"]
        assert {"name": "model-cache", "mountPath": contract.MODEL_CACHE_DIR} in container["volumeMounts"]
        env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        assert env[contract.ENV_MODEL_CACHE] == contract.MODEL_CACHE_DIR
        assert env["HF_HUB_CACHE"] == f"{contract.MODEL_CACHE_DIR}/hub"  # hub models: HF's own cache on it
    assert not any(v["name"] == "model-cache" for v in pod_of(ftj_body(), builders.Settings())["volumes"])
