"""The progress channel is least-privilege: a job's pod token, bound by the operator's own Role
builder, may patch its own resource's status and nothing else; the pod's fields (progress, stage)
fit the CRD's schema; and the channel never breaks training.

With the chart's progress-channel policy (a ValidatingAdmissionPolicy, rendered by helm and applied
to the real API server, bound to one test namespace only) the pod may change only the fields it
owns: phase, jobName, conditions, ... stay the operator's, whose own ServiceAccount (and an admin)
still writes them. The uid guard: a pod of a deleted resource cannot write into its re-created
namesake, even while its token is still valid there."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubetune_operator import builders
from kubetune_trainer.runtime import JSON_PATCH, MERGE_PATCH, StatusReporter
from manifests import minimal_ftj, minimal_mj

from kubetune.api import STAGE_MAX_LENGTH

pytestmark = pytest.mark.integration
BASE = "/apis/kubetune.dev/v1alpha1/namespaces/{ns}/finetunejobs"
MJ_BASE = "/apis/kubetune.dev/v1alpha1/namespaces/{ns}/mergejobs"
CHART = Path(__file__).resolve().parents[2] / "charts" / "kubetune"
VAP = "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicies"
VAP_BINDING = "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicybindings"
OPERATOR_SA = "kubetune-operator"


def create_ftj(cluster: Any, ns: str, name: str) -> dict[str, Any]:
    doc = copy.deepcopy(minimal_ftj())
    doc["metadata"] = {"name": name, "namespace": ns}
    return cluster.request("POST", BASE.format(ns=ns), doc)


def create_mj(cluster: Any, ns: str, name: str) -> dict[str, Any]:
    doc = copy.deepcopy(minimal_mj())
    doc["metadata"] = {"name": name, "namespace": ns}
    return cluster.request("POST", MJ_BASE.format(ns=ns), doc)


def reporter(cluster: Any, token_dir: Path, ns: str, name: str, kind: str = "FineTuneJob",
             uid: str | None = None) -> StatusReporter:
    return StatusReporter(server=cluster.server, token_file=token_dir / "token", ca_file=Path(cluster.ca_file),
                          kind=kind, name=name, namespace=ns, uid=uid)


def pod_identity(cluster: Any, body: dict[str, Any], token_dir: Path, owned: bool = True) -> str:
    """The job's ServiceAccount, Role and RoleBinding as the operator builds them; a token in
    ``token_dir/token``. ``owned=False`` leaves out their ownerReferences, so that they outlive the
    resource (as they do until the garbage collector gets to them)."""
    ns = body["metadata"]["namespace"]
    for doc in (builders.service_account(body), builders.role(body), builders.role_binding(body)):
        if not owned:
            doc["metadata"].pop("ownerReferences", None)
        group = "/api/v1" if doc["apiVersion"] == "v1" else f"/apis/{doc['apiVersion']}"
        plural = {"ServiceAccount": "serviceaccounts", "Role": "roles", "RoleBinding": "rolebindings"}[doc["kind"]]
        cluster.request("POST", f"{group}/namespaces/{ns}/{plural}", doc)
    token = cluster.create_token(ns, builders.service_account(body)["metadata"]["name"])
    token_dir.mkdir(parents=True, exist_ok=True)
    (token_dir / "token").write_text(token)
    return token


def test_pod_token_patches_only_its_own_status(crds_installed: Any, tmp_path: Path) -> None:
    cluster = crds_installed
    ns = f"chan-{uuid.uuid4().hex[:6]}"
    cluster.request("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    mine, other = create_ftj(cluster, ns, "mine"), create_ftj(cluster, ns, "other")
    pod_identity(cluster, mine, tmp_path)

    ok = reporter(cluster, tmp_path, ns, "mine")
    assert ok.enabled
    assert ok.patch({"progress": {"step": 3, "totalSteps": 10, "percent": 30, "loss": 2.5}})
    status = cluster.request("GET", f"{BASE.format(ns=ns)}/mine")["status"]
    assert status["progress"] == {"step": 3, "totalSteps": 10, "percent": 30, "loss": 2.5}

    # The pod's stage: cut by the reporter to the CRD's maxLength, which the API server enforces.
    long_stage = f"loading dataset s3://data/{'x' * 400}.jsonl"
    assert ok.patch({"stage": long_stage})
    status = cluster.request("GET", f"{BASE.format(ns=ns)}/mine")["status"]
    assert status["stage"] == long_stage[:STAGE_MAX_LENGTH - 3] + "..." and "message" not in status
    assert status["progress"]["step"] == 3  # a merge patch: the progress stays
    with pytest.raises(Exception, match="422"):
        cluster.request("PATCH", f"{BASE.format(ns=ns)}/mine/status", {"status": {"stage": long_stage}},
                        content_type="application/merge-patch+json")

    denied = reporter(cluster, tmp_path, ns, "other")  # the same token on another job
    assert denied.patch({"progress": {"step": 99}}) is False and denied.failures == 1
    assert "status" not in cluster.request("GET", f"{BASE.format(ns=ns)}/other")

    # The token cannot read the spec, list jobs, or read Secrets either.
    token = (tmp_path / "token").read_text()
    for path in (f"{BASE.format(ns=ns)}/mine", BASE.format(ns=ns), f"/api/v1/namespaces/{ns}/secrets"):
        with pytest.raises(Exception, match="403"):
            cluster.request("GET", path, token=token)
    assert other["metadata"]["name"] == "other"


def test_a_dead_channel_never_raises(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("x")
    dead = StatusReporter(server="https://127.0.0.1:9", token_file=tmp_path / "token", ca_file=None,
                          kind="FineTuneJob", name="a", namespace="b", timeout=2)
    assert dead.patch({"progress": {"step": 1}}) is False
    assert dead.patch({"progress": {"step": 2}}) is False and dead.failures == 2


# ------------------------------------------------------------------------- the chart's policy
def _helm() -> str:
    cached = Path(os.environ.get("KUBETUNE_CACHE") or Path.home() / ".cache" / "kubetune") / "helm" / "helm"
    found = os.environ.get("KUBETUNE_HELM") or shutil.which("helm") or (str(cached) if cached.exists() else None)
    assert found, "helm is needed: bash hack/build-helm.sh (or set KUBETUNE_HELM)"
    return found


def helm_template(release: str, ns: str, *sets: str, kube_version: str = "1.34.0") -> subprocess.CompletedProcess:
    args = [_helm(), "template", release, str(CHART), "--namespace", ns, "--kube-version", kube_version]
    for value in sets:
        args += ["--set", value]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def policy_docs(release: str, ns: str, *sets: str) -> list[dict[str, Any]]:
    """The chart's ValidatingAdmissionPolicy objects as rendered (policy first)."""
    import yaml

    out = helm_template(release, ns, *sets)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d and d["kind"].startswith("ValidatingAdmissionPolicy")]
    return sorted(docs, key=lambda d: d["kind"])


def render_policy(release: str, ns: str) -> list[dict[str, Any]]:
    """The chart's ValidatingAdmissionPolicy and its binding, for an operator whose ServiceAccount is
    ``ns/kubetune-operator``, bound to ``ns`` only (watchNamespaces): nothing else in the shared
    cluster is affected, the other tests' operator included."""
    docs = policy_docs(release, ns, f"serviceAccount.name={OPERATOR_SA}", f"watchNamespaces={{{ns}}}")
    assert [d["kind"] for d in docs] == ["ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"]
    return docs


def test_the_chart_renders_the_policy_for_its_own_operator() -> None:
    policy, binding = policy_docs("kt", "kubetune-system")  # the defaults: on, cluster-wide, Deny
    assert policy["metadata"]["name"] == binding["spec"]["policyName"] == "kt-kubetune-progress-channel"
    exempt = next(c for c in policy["spec"]["matchConditions"] if c["name"] == "not-the-operator")["expression"]
    assert exempt == '!(request.userInfo.username in ["system:serviceaccount:kubetune-system:kt-kubetune"])'
    assert policy["spec"]["failurePolicy"] == "Fail"
    assert policy["spec"]["matchConstraints"]["resourceRules"][0]["resources"] == ["finetunejobs/status",
                                                                                   "mergejobs/status"]
    assert binding["spec"]["validationActions"] == ["Deny"] and "matchResources" not in binding["spec"]

    policy, binding = policy_docs("kt", "ops", "watchNamespaces={team-a,team-b}", "serviceAccount.name=op",
                                  "progressChannelPolicy.exemptUsernames={system:serviceaccount:velero:velero}",
                                  "progressChannelPolicy.validationActions={Warn,Audit}")
    exempt = next(c for c in policy["spec"]["matchConditions"] if c["name"] == "not-the-operator")["expression"]
    assert exempt == ('!(request.userInfo.username in ["system:serviceaccount:ops:op",'
                      '"system:serviceaccount:velero:velero"])')
    assert binding["spec"]["validationActions"] == ["Warn", "Audit"]
    assert binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"] == [
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["team-a", "team-b"]}]

    assert policy_docs("kt", "kubetune-system", "progressChannelPolicy.enabled=false") == []
    old = helm_template("kt", "kubetune-system", kube_version="1.29.0")
    assert old.returncode != 0 and "progressChannelPolicy needs Kubernetes >= 1.30" in old.stderr
    assert helm_template("kt", "kubetune-system", "progressChannelPolicy.enabled=false",
                         kube_version="1.29.0").returncode == 0


def status_path(ns: str, name: str, kind: str = "FineTuneJob") -> str:
    return f"{(BASE if kind == 'FineTuneJob' else MJ_BASE).format(ns=ns)}/{name}/status"


def merge_patch(cluster: Any, path: str, status: dict[str, Any], token: str | None = None,
                dry_run: bool = False) -> Any:
    return cluster.request("PATCH", path + ("?dryRun=All" if dry_run else ""), {"status": status}, token=token,
                           content_type=MERGE_PATCH)


def refused(call: Any) -> Any:
    """The ApiError a call raised (it must raise)."""
    try:
        call()
    except Exception as err:  # noqa: BLE001 - the harness's ApiError
        assert hasattr(err, "status"), err
        return err
    raise AssertionError("the request was accepted")


@pytest.fixture
def policy_ns(crds_installed: Any, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A namespace with the chart's policy bound to it, a FineTuneJob ``probe`` and its pod's token,
    and the operator's ServiceAccount (a Role on the status of both kinds) with its token."""
    cluster = crds_installed
    ns = f"vap-{uuid.uuid4().hex[:6]}"
    cluster.request("POST", "/api/v1/namespaces", {"metadata": {"name": ns}})
    docs = render_policy(f"chan-{ns}", ns)
    for doc in docs:
        cluster.request("POST", VAP if doc["kind"] == "ValidatingAdmissionPolicy" else VAP_BINDING, doc)
    try:
        rbac = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}"
        cluster.request("POST", f"/api/v1/namespaces/{ns}/serviceaccounts", {"metadata": {"name": OPERATOR_SA}})
        cluster.request("POST", f"{rbac}/roles", {"metadata": {"name": OPERATOR_SA}, "rules": [
            {"apiGroups": ["kubetune.dev"], "resources": ["finetunejobs/status", "mergejobs/status"],
             "verbs": ["get", "patch"]}]})
        cluster.request("POST", f"{rbac}/rolebindings", {
            "metadata": {"name": OPERATOR_SA},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": OPERATOR_SA},
            "subjects": [{"kind": "ServiceAccount", "name": OPERATOR_SA, "namespace": ns}]})
        probe = create_ftj(cluster, ns, "probe")
        probe_token = pod_identity(cluster, probe, tmp_path / "probe")
        # The policy takes effect once the API server's policy informer has it: probe with a dry run.
        deadline = time.monotonic() + 60
        while True:
            try:
                merge_patch(cluster, status_path(ns, "probe"), {"phase": "Failed"}, probe_token, dry_run=True)
            except Exception as err:  # noqa: BLE001
                if getattr(err, "status", None) == 403:
                    break
                raise
            assert time.monotonic() < deadline, "the progress-channel policy never took effect"
            time.sleep(0.5)
        yield {"cluster": cluster, "ns": ns, "policy": docs[0]["metadata"]["name"],
               "operator_token": cluster.create_token(ns, OPERATOR_SA)}
    finally:
        for doc in docs:
            base = VAP if doc["kind"] == "ValidatingAdmissionPolicy" else VAP_BINDING
            cluster.request("DELETE", f"{base}/{doc['metadata']['name']}", ok404=True)
        cluster.request("DELETE", f"/api/v1/namespaces/{ns}", ok404=True)


def test_the_policy_lets_a_pod_write_only_its_own_fields(policy_ns: dict[str, Any], tmp_path: Path) -> None:
    cluster, ns = policy_ns["cluster"], policy_ns["ns"]
    ftj = create_ftj(cluster, ns, "ft")
    token = pod_identity(cluster, ftj, tmp_path)
    path = status_path(ns, "ft")
    username = f"system:serviceaccount:{ns}:{builders.service_account(ftj)['metadata']['name']}"

    # The operator's own ServiceAccount writes its fields, as the operator does.
    operator_status = {"phase": "Running", "jobName": "ft-train", "message": "pod ft-train-x is running",
                       "observedGeneration": 1, "attempts": 1, "startTime": "2026-12-02T10:00:00Z",
                       "model": "SmolLM2", "mergeJobName": "ft-merge",
                       "conditions": [{"type": "Ready", "status": "False", "reason": "Running", "message": "running",
                                       "lastTransitionTime": "2026-12-02T10:00:00Z", "observedGeneration": 1}]}
    merge_patch(cluster, path, operator_status, policy_ns["operator_token"])

    # The pod's own fields land (through the real reporter, uid-guarded): all of them, in one go too.
    pod = reporter(cluster, tmp_path, ns, "ft", uid=ftj["metadata"]["uid"])
    pod_status = {"stage": "training from step 0", "progress": {"step": 3, "totalSteps": 10, "loss": 2.5},
                  "data": {"trainingRows": 90, "evalRows": 10}, "checkpointUri": "s3://out/run-1/checkpoints/3",
                  "adapterUri": "s3://out/run-1/adapter", "reportUri": "s3://out/run-1/report.md",
                  "wandbUrl": "https://wandb.ai/team/run"}
    assert pod.patch({"stage": "starting"}) and pod.patch(pod_status), pod.failures
    status = cluster.request("GET", f"{BASE.format(ns=ns)}/ft")["status"]
    assert {k: status[k] for k in pod_status} == pod_status
    assert {k: status[k] for k in operator_status} == operator_status  # untouched
    assert merge_patch(cluster, path, {"phase": "Running", "stage": "x"}, token)  # an unchanged value is no change

    # Every operator field is refused from the pod's token: 403 with the policy's message naming it.
    forbidden = {"phase": "Succeeded", "jobName": "elsewhere", "message": "all good", "observedGeneration": 9,
                 "attempts": 0, "startTime": "2020-01-01T00:00:00Z", "completionTime": "2026-12-02T11:00:00Z",
                 "model": "other", "mergeJobName": "evil",
                 "conditions": [{"type": "Ready", "status": "True", "reason": "Succeeded", "message": "done",
                                 "lastTransitionTime": "2026-12-02T11:00:00Z"}]}
    for field, value in forbidden.items():
        err = refused(lambda f=field, v=value: merge_patch(cluster, path, {f: v, "stage": "sneaky"}, token))
        assert err.status == 403, err
        message = json.loads(err.body)["message"]
        assert f"status.{field} is written by the kubetune operator only; {username} may change only " \
               "status.stage, status.progress, status.data, status.memory, status.checkpointUri, status.adapterUri, " \
               "status.reportUri, status.wandbUrl" in message, message
        assert f"ValidatingAdmissionPolicy '{policy_ns['policy']}'" in message
    err = refused(lambda: merge_patch(cluster, path, {"phase": "Failed", "jobName": None}, token))
    assert "status.phase, status.jobName are written by the kubetune operator only" in json.loads(err.body)["message"]
    # Removing counts too, with a JSON patch as with a merge patch's null.
    err = refused(lambda: cluster.request("PATCH", path, [{"op": "remove", "path": "/status/phase"}], token=token,
                                          content_type=JSON_PATCH))
    assert err.status == 403 and "status.phase is written" in err.body
    err = refused(lambda: cluster.request("PATCH", path, {"status": None}, token=token, content_type=MERGE_PATCH))
    assert err.status == 403
    # A refused patch is refused whole: its own fields did not land either.
    status = cluster.request("GET", f"{BASE.format(ns=ns)}/ft")["status"]
    assert status["stage"] == "x" and {k: status[k] for k in operator_status} == operator_status

    # The operator's ServiceAccount and an admin still write every field.
    merge_patch(cluster, path, {"phase": "Succeeded", "conditions": forbidden["conditions"]},
                policy_ns["operator_token"])
    merge_patch(cluster, path, {"message": "fixed by hand", "jobName": "ft-train-2"})
    status = cluster.request("GET", f"{BASE.format(ns=ns)}/ft")["status"]
    assert status["phase"] == "Succeeded" and status["message"] == "fixed by hand" and status["jobName"] == "ft-train-2"


def test_the_policy_covers_merge_jobs(policy_ns: dict[str, Any], tmp_path: Path) -> None:
    cluster, ns = policy_ns["cluster"], policy_ns["ns"]
    mj = create_mj(cluster, ns, "mj")
    token = pod_identity(cluster, mj, tmp_path)
    merge_patch(cluster, status_path(ns, "mj", "MergeJob"), {"phase": "Running", "jobName": "mj-merge"},
                policy_ns["operator_token"])
    pod = reporter(cluster, tmp_path, ns, "mj", kind="MergeJob", uid=mj["metadata"]["uid"])
    result = {"stage": "done", "mergedUri": "s3://out/merged", "adapterUri": "s3://out/run-1/adapter",
              "verification": {"maxLogitDiff": 0.01, "tolerance": 0.05, "passed": True},
              "samples": [{"prompt": "hi", "output": "hello"}]}
    assert pod.patch(result), pod.failures
    status = cluster.request("GET", f"{MJ_BASE.format(ns=ns)}/mj")["status"]
    assert {k: status[k] for k in result} == result and status["phase"] == "Running"
    err = refused(lambda: merge_patch(cluster, status_path(ns, "mj", "MergeJob"), {"phase": "Succeeded"}, token))
    assert err.status == 403
    assert "status.phase is written by the kubetune operator only" in err.body
    assert "may change only status.stage, status.mergedUri, status.adapterUri, status.verification, " \
           "status.samples" in err.body


def test_a_pod_cannot_write_into_a_re_created_namesake(crds_installed: Any, tmp_path: Path) -> None:
    """The old pod's token stays valid (its ServiceAccount and name-bound Role outlive the resource
    until the garbage collector runs: here, for good), yet the uid guard keeps it out."""
    cluster = crds_installed
    ns = f"uid-{uuid.uuid4().hex[:6]}"
    cluster.request("POST", "/api/v1/namespaces", {"metadata": {"name": ns}})
    try:
        old = create_ftj(cluster, ns, "ft")
        token = pod_identity(cluster, old, tmp_path, owned=False)
        pod = reporter(cluster, tmp_path, ns, "ft", uid=old["metadata"]["uid"])
        assert pod.patch({"stage": "training"}) and pod.patch({"progress": {"step": 1}})  # the first adds the status

        cluster.request("DELETE", f"{BASE.format(ns=ns)}/ft")
        deadline = time.monotonic() + 30
        while cluster.request("GET", f"{BASE.format(ns=ns)}/ft", ok404=True) is not None:
            assert time.monotonic() < deadline, "the FineTuneJob was not deleted"
            time.sleep(0.2)
        assert pod.patch({"progress": {"step": 2}}) is False and pod.enabled  # gone (404): a plain failure
        new = create_ftj(cluster, ns, "ft")
        assert new["metadata"]["uid"] != old["metadata"]["uid"]
        merge_patch(cluster, status_path(ns, "ft"), {"phase": "Pending", "message": "creating the Job"})

        # What the reporter sends, by hand: the API server refuses it with 422 (the uid test fails).
        guarded = [{"op": "test", "path": "/metadata/uid", "value": old["metadata"]["uid"]},
                   {"op": "add", "path": "/status/stage", "value": "stale"}]
        err = refused(lambda: cluster.request("PATCH", status_path(ns, "ft"), guarded, token=token,
                                              content_type=JSON_PATCH))
        assert err.status == 422, err

        assert pod.patch({"progress": {"step": 3}, "stage": "stale"}) is False
        assert not pod.enabled and new["metadata"]["uid"] in (pod.stopped or "")
        assert pod.patch({"stage": "later"}) is False  # stopped for good: nothing is sent any more
        status = cluster.request("GET", f"{BASE.format(ns=ns)}/ft")["status"]
        assert status == {"phase": "Pending", "message": "creating the Job"}

        # Why not a merge patch with metadata.uid: the status subresource keeps the stored metadata and
        # ignores the patch's, so that patch lands in the namesake.
        cluster.request("PATCH", status_path(ns, "ft"), {"metadata": {"uid": old["metadata"]["uid"]},
                                                         "status": {"stage": "stale"}},
                        token=token, content_type=MERGE_PATCH)
        assert cluster.request("GET", f"{BASE.format(ns=ns)}/ft")["status"]["stage"] == "stale"
    finally:
        cluster.request("DELETE", f"/api/v1/namespaces/{ns}", ok404=True)
