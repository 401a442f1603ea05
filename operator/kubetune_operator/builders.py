"""Pure builders: a FineTuneJob/MergeJob (+ operator settings) -> the child manifests, as dicts.

No I/O here. Every child carries a controller ownerReference to its resource, so deleting the
FineTuneJob (or MergeJob) lets the garbage collector delete everything it created. Child names
are deterministic, at most 63 characters, with a hash suffix when the resource name is long, so a
restarted operator finds (adopts) what it created before: the Job is ``<name>-train`` /
``<name>-merge`` (what users look for; on HTTP 409 its ownerReference is checked), its ConfigMap,
ServiceAccount, Role and RoleBinding carry the first 8 characters of the resource's uid as well
(``<name>-train-1a2b3c4d``), so a resource re-created under the same name never adopts the
children of its deleted namesake that the garbage collector has yet to remove: a 409 on those
names can only mean "mine, made by an earlier reconcile". A multi-node FineTuneJob's Indexed Job
and headless Service name DNS labels (pod hostnames, the Service): their names stay those where
they are labels, and are made labels (dots to dashes, a hash of the name) where not.

Secrets are only ever referenced (``secretKeyRef``), never copied into the ConfigMap or the Job.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from kubetune import api, contract

OPERATOR = "kubetune-operator"
MAX_NAME = 63
LABEL_OWNER = "kubetune.dev/owner"  # annotation "<kind>/<name>" on Jobs and pods: finds the owner
COMPONENT = {"FineTuneJob": "trainer", "MergeJob": "merge"}
SUFFIX = {"FineTuneJob": "train", "MergeJob": "merge"}
COMMAND = {"FineTuneJob": "train", "MergeJob": "merge"}
PLURAL = {"FineTuneJob": "finetunejobs", "MergeJob": "mergejobs"}
TERMINATION_GRACE_SECONDS = 300  # long enough to upload a checkpoint after SIGTERM
RUN_AS = 1000


@dataclass(frozen=True)
class Settings:
    """Operator-wide settings that shape the children."""

    trainer_image: str = "ghcr.io/kubetune/trainer:0.1.0"
    """Image used when the spec sets none (``--trainer-image`` / KUBETUNE_TRAINER_IMAGE)."""
    image_pull_policy: str = "IfNotPresent"
    termination_grace_seconds: int = TERMINATION_GRACE_SECONDS
    startup_timeout_seconds: int = 900
    """Default of ``spec.startupTimeoutSeconds`` (``--startup-timeout``)."""
    run_as_user: int | None = RUN_AS
    """UID (and GID, fsGroup) of every pod unless its spec.pod sets one; None leaves them to the
    platform (OpenShift assigns one per namespace) (``--run-as-user``, chart value runAsUser)."""
    check_secrets: bool = True
    """Read the Secrets a job names before making its pod (``--check-secrets``, chart value checkSecrets)."""
    model_cache_claim: str | None = None
    """Default of spec.modelCache.claimName (``--model-cache-claim``, chart value modelCache.claimName)."""
    pod_defaults: api.PodSettings | None = None
    """The platform's pod settings for every job, under each job's own spec.pod (``--pod-defaults``,
    chart value podDefaults)."""


# ----------------------------------------------------------------------------------------------
# names and metadata
# ----------------------------------------------------------------------------------------------


def _short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def child_name(name: str, suffix: str) -> str:
    """``<name>-<suffix>``, shortened to 63 characters with a stable hash of ``name`` when needed."""
    full = f"{name}-{suffix}"
    if len(full) <= MAX_NAME:
        return full
    keep = MAX_NAME - len(suffix) - 10  # "-" + 8 hash chars + "-"
    head = name[:keep].rstrip("-.")
    return f"{head}-{_short_hash(name)}-{suffix}"


def label_name(name: str, suffix: str, limit: int = MAX_NAME) -> str:
    """``<name>-<suffix>`` as a DNS label of at most ``limit`` characters: :func:`child_name`'s
    answer when it is one, else with the dots of ``name`` made dashes and a stable hash of ``name``
    (so two resource names never meet). What hostnames and Service names need."""
    full = f"{name}-{suffix}"
    if len(full) <= limit and "." not in full:
        return full
    head = name[:limit - len(suffix) - 10].replace(".", "-").rstrip("-")  # "-" + 8 hash chars + "-"
    return f"{head}-{_short_hash(name)}-{suffix}"


def label_value(value: str) -> str:
    """A label value (<= 63 chars, alphanumeric at both ends); long values get a hash suffix."""
    if len(value) <= MAX_NAME:
        return value
    return f"{value[:MAX_NAME - 9].rstrip('-._')}-{_short_hash(value)}"


def job_name(kind: str, name: str, nodes: int = 1) -> str:
    """Name of the batch/v1 Job: ``<name>-train`` / ``<name>-merge``. The Indexed Job of a multi-node
    FineTuneJob names its pods' hostnames ``<job>-<index>``, which must be DNS labels: its name is
    one, with room for the last index (:func:`label_name`; ``<name>-train`` for most names)."""
    if nodes > 1:
        return label_name(name, SUFFIX[kind], MAX_NAME - 1 - len(str(nodes - 1)))
    return child_name(name, SUFFIX[kind])


def support_name(body: dict[str, Any]) -> str:
    """Name of the Job's ConfigMap, ServiceAccount, Role and RoleBinding: the Job's name plus 8
    characters of the resource's uid (a namesake's leftovers never match)."""
    meta = body["metadata"]
    return child_name(meta["name"], f"{SUFFIX[body['kind']]}-{str(meta['uid']).replace('-', '')[:8]}")


def merge_job_name(name: str) -> str:
    """Name of the MergeJob a FineTuneJob creates when ``spec.merge.enabled``."""
    return child_name(name, "merge")


def labels(kind: str, name: str) -> dict[str, str]:
    """Labels on every child (and on the pod)."""
    return {
        "app.kubernetes.io/name": "kubetune",
        "app.kubernetes.io/instance": label_value(name),
        "app.kubernetes.io/component": COMPONENT[kind],
        "app.kubernetes.io/managed-by": OPERATOR,
        contract.LABEL_JOB_NAME: label_value(name),
        contract.LABEL_KIND: kind,
    }


def owner_reference(body: dict[str, Any]) -> dict[str, Any]:
    """Controller ownerReference to a FineTuneJob/MergeJob (body as read from the API)."""
    meta = body["metadata"]
    return {
        "apiVersion": body.get("apiVersion", api.API_VERSION),
        "kind": body["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(body: dict[str, Any], name: str) -> dict[str, Any]:
    meta = body["metadata"]
    return {
        "name": name,
        "namespace": meta["namespace"],
        "labels": labels(body["kind"], meta["name"]),
        "annotations": {LABEL_OWNER: f"{body['kind']}/{meta['name']}"},
        "ownerReferences": [owner_reference(body)],
    }


# ----------------------------------------------------------------------------------------------
# children
# ----------------------------------------------------------------------------------------------


def config_map(body: dict[str, Any], resolved_spec: api.FineTuneJobSpec | api.MergeJobSpec) -> dict[str, Any]:
    """The ConfigMap holding the resolved spec (camelCase JSON, secrets only by reference)."""
    name = support_name(body)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(body, name),
        "data": {contract.SPEC_KEY: json.dumps(resolved_spec.to_wire(), indent=2, sort_keys=True)},
    }


def service_account(body: dict[str, Any]) -> dict[str, Any]:
    """The pod's own identity: it may only patch the status of its own resource."""
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _metadata(body, support_name(body))}


def role(body: dict[str, Any]) -> dict[str, Any]:
    """get/patch on ``<plural>/status`` of this one resource (resourceNames), nothing else."""
    kind, name = body["kind"], body["metadata"]["name"]
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _metadata(body, support_name(body)),
        "rules": [
            {
                "apiGroups": [api.GROUP],
                "resources": [f"{PLURAL[kind]}/status"],
                "resourceNames": [name],
                "verbs": ["get", "patch"],
            }
        ],
    }


def role_binding(body: dict[str, Any], settings: Settings | None = None) -> dict[str, Any]:
    """Binds :func:`role` to the pod's ServiceAccount: :func:`service_account`, or the one spec.pod
    (or the operator's pod defaults) names (workload identity)."""
    meta = body["metadata"]
    name = support_name(body)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(body, name),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": pod_service_account(body, settings),
                      "namespace": meta["namespace"]}],
    }


def pod_service_account(body: dict[str, Any], settings: Settings | None = None) -> str:
    """The ServiceAccount the pod runs as (read from the raw spec: also when it cannot be parsed)."""
    raw = ((body.get("spec") or {}).get("pod") or {}).get("serviceAccountName")
    default = settings.pod_defaults.service_account_name if settings and settings.pod_defaults else None
    return raw or default or support_name(body)


def merge_pod_settings(defaults: api.PodSettings | None, own: api.PodSettings | None) -> api.PodSettings:
    """The platform's defaults, then the job's own: maps merged and lists joined (the job's entry
    wins where both name one: a label key, an env name, a volume name, a mount path), single values
    the job's where it sets them."""
    a, b = defaults or api.PodSettings(), own or api.PodSettings()

    def keyed(key: Any, first: list[Any] | None, second: list[Any] | None) -> list[Any] | None:
        merged = {key(x): x for x in first or []}
        merged.update({key(x): x for x in second or []})
        return list(merged.values()) or None

    return api.PodSettings.model_construct(
        labels={**(a.labels or {}), **(b.labels or {})} or None,
        annotations={**(a.annotations or {}), **(b.annotations or {})} or None,
        image_pull_secrets=list(dict.fromkeys([*(a.image_pull_secrets or []), *(b.image_pull_secrets or [])]))
        or None,
        runtime_class_name=b.runtime_class_name or a.runtime_class_name,
        service_account_name=b.service_account_name or a.service_account_name,
        run_as_user=b.run_as_user or a.run_as_user,
        run_as_group=b.run_as_group if b.run_as_group is not None else a.run_as_group,
        fs_group=b.fs_group if b.fs_group is not None else a.fs_group,
        env=keyed(lambda e: e.name, a.env, b.env),
        volumes=keyed(lambda v: v.name, a.volumes, b.volumes),
        volume_mounts=keyed(lambda m: m.mount_path, a.volume_mounts, b.volume_mounts),
    )


def rendezvous_service_name(body: dict[str, Any]) -> str:
    """Name of the headless Service of a multi-node FineTuneJob (and its pods' ``subdomain``):
    :func:`support_name` (uid-derived, so a namesake's leftover never matches) where that is a
    DNS-1035 label, else one made from it (:func:`label_name`; ``r`` first when the name does not
    start with a letter)."""
    meta = body["metadata"]
    name = meta["name"] if meta["name"][0].isalpha() else f"r{meta['name']}"
    return label_name(name, f"{SUFFIX[body['kind']]}-{str(meta['uid']).replace('-', '')[:8]}")


def rendezvous_service(body: dict[str, Any]) -> dict[str, Any]:
    """The headless Service that gives each pod of a multi-node FineTuneJob a DNS name,
    ``<job>-<index>.<service>``: the ranks meet at pod 0's (torchrun's c10d rendezvous). Not-ready
    addresses are published: the pods meet before anything could mark them ready."""
    meta = body["metadata"]
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _metadata(body, rendezvous_service_name(body)),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {contract.LABEL_JOB_NAME: label_value(meta["name"]), contract.LABEL_KIND: body["kind"]},
            "ports": [{"name": "rdzv", "port": contract.RDZV_PORT, "targetPort": contract.RDZV_PORT,
                       "protocol": "TCP"}],
        },
    }


def needs_service(spec: api.FineTuneJobSpec | api.MergeJobSpec | None) -> bool:
    return isinstance(spec, api.FineTuneJobSpec) and spec.resources.nodes > 1


def rank_env(body: dict[str, Any], spec: api.FineTuneJobSpec) -> list[dict[str, Any]]:
    """The torchrun shape for ``kubetune train`` (:mod:`kubetune.contract`); none for one rank."""
    res = spec.resources
    if spec.world_size() < 2:
        return []
    env = [{"name": contract.ENV_NPROC_PER_NODE, "value": str(max(res.gpus, 1))},
           {"name": contract.ENV_NNODES, "value": str(res.nodes)}]
    if res.nodes > 1:
        name = job_name(body["kind"], body["metadata"]["name"], res.nodes)
        endpoint = f"{name}-0.{rendezvous_service_name(body)}:{contract.RDZV_PORT}"
        env += [{"name": contract.ENV_NODE_RANK, "valueFrom": {"fieldRef": {
                    "fieldPath": f"metadata.annotations['{contract.COMPLETION_INDEX_ANNOTATION}']"}}},
                {"name": contract.ENV_RDZV_ENDPOINT, "value": endpoint},
                {"name": contract.ENV_RDZV_ID, "value": body["metadata"]["uid"]}]
    return env


def _secret_env(env_name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": env_name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def credential_env(spec: api.FineTuneJobSpec | api.MergeJobSpec) -> list[dict[str, Any]]:
    """Credentials as secretKeyRef env vars, from the Secrets named in the (resolved) spec."""
    env: list[dict[str, Any]] = []
    storage = spec.storage
    if storage is not None and storage.secret_ref is not None:
        ref = storage.secret_ref
        env.append(_secret_env(contract.ENV_AWS_ACCESS_KEY_ID, ref.name, ref.access_key_id_key))
        env.append(_secret_env(contract.ENV_AWS_SECRET_ACCESS_KEY, ref.name, ref.secret_access_key_key))
    if isinstance(spec, api.FineTuneJobSpec):
        model = spec.model
        wandb = spec.tracking.wandb if spec.tracking else None
        if wandb is not None and wandb.secret_ref is not None:
            env.append(_secret_env(contract.ENV_WANDB_API_KEY, wandb.secret_ref.name, wandb.secret_ref.key))
        if spec.dataset.secret_ref is not None:
            env.append(_secret_env(contract.ENV_DATASET_TOKEN, spec.dataset.secret_ref.name,
                                   spec.dataset.secret_ref.key))
    else:
        model = spec.source.base_model  # type: ignore[assignment]
    if model is not None and model.secret_ref is not None:
        env.append(_secret_env(contract.ENV_HF_TOKEN, model.secret_ref.name, model.secret_ref.key))
    return env


def resources(res: api.Resources) -> dict[str, Any]:
    """Container resources: GPUs as a limit; cpu/memory with requests == limits when given."""
    limits: dict[str, str] = {}
    if res.gpus > 0:
        limits[res.gpu_resource] = str(res.gpus)
    if res.cpu is not None:
        limits["cpu"] = res.cpu
    if res.memory is not None:
        limits["memory"] = res.memory
    out: dict[str, Any] = {"limits": limits} if limits else {}
    requests = {k: v for k, v in limits.items() if k in ("cpu", "memory")}
    if requests:
        out["requests"] = requests
    return out


def pod_failure_policy(container: str) -> dict[str, Any]:
    """Permanent exit codes fail the Job at once; preemption and disruptions do not count."""
    return {
        "rules": [
            {"action": "FailJob",
             "onExitCodes": {"containerName": container, "operator": "In",
                             "values": list(contract.PERMANENT_EXIT_CODES)}},
            {"action": "Ignore",
             "onExitCodes": {"containerName": container, "operator": "In",
                             "values": [contract.EXIT_PREEMPTED]}},
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]
    }


def pod_security_context(user: int | None = RUN_AS, group: int | None = None,
                         fs_group: int | None = None) -> dict[str, Any]:
    """Restricted: non-root, RuntimeDefault seccomp. The UID (GID and fsGroup default to it) may be
    left out (``user`` None) for a platform that assigns one."""
    out: dict[str, Any] = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    group = group if group is not None else user
    fs_group = fs_group if fs_group is not None else group
    for key, value in (("runAsUser", user), ("runAsGroup", group), ("fsGroup", fs_group)):
        if value is not None:
            out[key] = value
    return out


def container_security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
    }


def _placement(res: api.Resources) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if res.node_selector:
        out["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        out["tolerations"] = [t.to_wire() for t in res.tolerations]
    if res.affinity:
        out["affinity"] = res.affinity
    if res.priority_class_name:
        out["priorityClassName"] = res.priority_class_name
    return out


def gpu_memory(spec: api.FineTuneJobSpec | api.MergeJobSpec, nodes: list[dict[str, Any]]) -> tuple[int, str] | None:
    """(MiB, where from): the memory of the GPUs a FineTuneJob may get, for the trainer's "will it
    fit?" check -- the smallest GPU feature-discovery label (``nvidia.com/gpu.memory``, MiB) of the
    nodes its GPU pod could run on (its nodeSelector matches, the node has ``gpus`` of its GPU
    resource). None when resources.gpuMemory says it already, the job asks for no GPU, or no such
    node has the label. Taints and affinity are not weighed: the smallest GPU is the safe side."""
    if not isinstance(spec, api.FineTuneJobSpec) or spec.resources.gpus == 0 or spec.resources.gpu_memory:
        return None
    wanted = spec.resources.node_selector or {}
    found: list[tuple[int, str]] = []
    for node in nodes:
        meta = node.get("metadata") or {}
        node_labels = meta.get("labels") or {}
        if any(node_labels.get(k) != v for k, v in wanted.items()):
            continue
        have = str(((node.get("status") or {}).get("allocatable") or {}).get(spec.resources.gpu_resource, "0"))
        value = str(node_labels.get(contract.GPU_MEMORY_LABEL, ""))
        if have.isdigit() and int(have) >= spec.resources.gpus and value.isdigit() and int(value) > 0:
            found.append((int(value), meta.get("name", "?")))
    if not found:
        return None
    mib, name = min(found)
    return mib, (f"the {contract.GPU_MEMORY_LABEL} label of node {name}, the smallest of {len(found)} node(s) "
                 f"with {spec.resources.gpus} {spec.resources.gpu_resource}")


def gpu_memory_env(found: tuple[int, str] | None) -> list[dict[str, str]]:
    if found is None:
        return []
    return [{"name": contract.ENV_GPU_MEMORY_MIB, "value": str(found[0])},
            {"name": contract.ENV_GPU_MEMORY_SOURCE, "value": found[1]}]


def job(body: dict[str, Any], resolved_spec: api.FineTuneJobSpec | api.MergeJobSpec,
        settings: Settings, suspend: bool, gpu: tuple[int, str] | None = None) -> dict[str, Any]:
    """The batch/v1 Job: one pod, restartPolicy Never, retries with the pod failure policy.

    A FineTuneJob with several ranks (docs/distributed.md): ``gpus > 1`` sets the torchrun shape in
    the pod's env (:func:`rank_env`); ``nodes: N > 1`` makes it an Indexed Job of N pods
    (completions = parallelism = N) under the headless Service (``subdomain``), each pod a
    rendezvous port. Pods are replaced only once the old one has terminated
    (``podReplacementPolicy: Failed``, what a pod failure policy implies): the replacement takes the
    same hostname. The pod failure policy applies to every pod, and ``backoffLimit`` is
    ``spec.backoffLimit x N``: when pod 0, which hosts the rendezvous, is lost, every other pod fails
    with it, so one incident can fail each pod once."""
    kind, meta = body["kind"], body["metadata"]
    spec = resolved_spec
    name = job_name(kind, meta["name"], spec.resources.nodes)
    container = COMPONENT[kind]
    env = [
        {"name": contract.ENV_SPEC_FILE, "value": contract.SPEC_FILE},
        {"name": contract.ENV_KIND, "value": kind},
        {"name": contract.ENV_NAME, "value": meta["name"]},
        {"name": contract.ENV_NAMESPACE, "value": meta["namespace"]},
        {"name": contract.ENV_UID, "value": meta["uid"]},
        {"name": contract.ENV_TERMINATION_LOG, "value": contract.DEFAULT_TERMINATION_LOG},
        {"name": contract.ENV_WORK_DIR, "value": contract.WORK_DIR},
        {"name": "HF_HOME", "value": contract.CACHE_DIR},
        {"name": "HOME", "value": "/tmp"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        *credential_env(spec),
        *(rank_env(body, spec) if isinstance(spec, api.FineTuneJobSpec) else []),
        *gpu_memory_env(gpu),
    ]
    pod = merge_pod_settings(settings.pod_defaults, spec.pod)
    own_env = {e.name for e in pod.env or []}
    env = [e for e in env if e["name"] not in own_env] + [e.to_wire() for e in pod.env or []]
    pod_meta = {"labels": {**(pod.labels or {}), **labels(kind, meta["name"])},
                "annotations": {**(pod.annotations or {}), LABEL_OWNER: f"{kind}/{meta['name']}"}}
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": pod.service_account_name or support_name(body),
        "automountServiceAccountToken": True,
        "terminationGracePeriodSeconds": settings.termination_grace_seconds,
        "securityContext": pod_security_context(pod.run_as_user or settings.run_as_user, pod.run_as_group,
                                                pod.fs_group),
        **_placement(spec.resources),
        "containers": [
            {
                "name": container,
                "image": spec.image or settings.trainer_image,
                "imagePullPolicy": settings.image_pull_policy,
                "command": ["kubetune", COMMAND[kind], "--spec", contract.SPEC_FILE],
                "env": env,
                "resources": resources(spec.resources),
                "volumeMounts": [
                    {"name": "spec", "mountPath": contract.SPEC_DIR, "readOnly": True},
                    {"name": "work", "mountPath": contract.WORK_DIR},
                    {"name": "cache", "mountPath": contract.CACHE_DIR},
                    {"name": "tmp", "mountPath": "/tmp"},
                    {"name": "dshm", "mountPath": "/dev/shm"},
                ],
                "terminationMessagePath": contract.DEFAULT_TERMINATION_LOG,
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "securityContext": container_security_context(),
            }
        ],
        "volumes": [
            {"name": "spec", "configMap": {"name": support_name(body), "items": [{"key": contract.SPEC_KEY,
                                                                      "path": contract.SPEC_KEY}]}},
            {"name": "work", "emptyDir": {}},
            {"name": "cache", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shm_size}},
            *(v.model_dump(by_alias=True, exclude_none=True, mode="json") for v in pod.volumes or []),
        ],
    }
    claim = spec.model_cache.claim_name if spec.model_cache else settings.model_cache_claim
    if claim:  # base models by content, shared by retries and later jobs (hub models: HF's own cache)
        pod_spec["volumes"].append({"name": "model-cache", "persistentVolumeClaim": {"claimName": claim}})
        pod_spec["containers"][0]["volumeMounts"].append({"name": "model-cache",
                                                          "mountPath": contract.MODEL_CACHE_DIR})
        pod_spec["containers"][0]["env"] += [
            {"name": contract.ENV_MODEL_CACHE, "value": contract.MODEL_CACHE_DIR},
            {"name": "HF_HUB_CACHE", "value": f"{contract.MODEL_CACHE_DIR}/hub"}]
    pod_spec["containers"][0]["volumeMounts"] += [m.to_wire() for m in pod.volume_mounts or []]
    if pod.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in pod.image_pull_secrets]
    if pod.runtime_class_name:
        pod_spec["runtimeClassName"] = pod.runtime_class_name
    job_meta = _metadata(body, name)
    if spec.queue_name:
        job_meta["labels"][contract.LABEL_QUEUE] = spec.queue_name
    if spec.workload_priority_class_name:
        job_meta["labels"][contract.LABEL_PRIORITY_CLASS] = spec.workload_priority_class_name
    nodes = spec.resources.nodes
    job_spec: dict[str, Any] = {
        "parallelism": nodes,
        "completions": nodes,
        "backoffLimit": spec.backoff_limit * nodes,
        "suspend": suspend,
        "podFailurePolicy": pod_failure_policy(container),
        "template": {"metadata": pod_meta, "spec": pod_spec},
    }
    if needs_service(spec):
        job_spec.update(completionMode="Indexed", podReplacementPolicy="Failed")
        pod_spec["subdomain"] = rendezvous_service_name(body)
        pod_spec["containers"][0]["ports"] = [{"name": "rdzv", "containerPort": contract.RDZV_PORT,
                                               "protocol": "TCP"}]
    if spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    # no ttlSecondsAfterFinished here: the operator sets it (ttl_patch) once the end is in the status
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": job_meta, "spec": job_spec}


def prepares(spec: api.FineTuneJobSpec | api.MergeJobSpec | None) -> bool:
    """Whether the FineTuneJob runs a separate CPU prepare Job before its GPU Job (spec.prepare)."""
    return isinstance(spec, api.FineTuneJobSpec) and spec.prepare.mode == "separate"


def prepare_job_name(name: str) -> str:
    return child_name(name, "prepare")


def prepare_job(body: dict[str, Any], resolved_spec: api.FineTuneJobSpec, settings: Settings,
                gpu: tuple[int, str] | None = None) -> dict[str, Any]:
    """The CPU-only Job of the prepare stage (``kubetune prepare``): the trainer's pod (image, spec,
    credentials, pod settings, model cache) with spec.prepare's cpu and memory and no GPU, placed by
    spec.prepare's nodeSelector and tolerations when it sets either (a CPU pool), else like the GPU
    pod (resources' placement); never queued in Kueue and never suspended (it holds no quota). One
    pod; permanent exit codes fail it at once, a transient failure is retried up to spec.backoffLimit."""
    res, prep = resolved_spec.resources, resolved_spec.prepare
    own_placement = prep.node_selector is not None or prep.tolerations is not None
    cpu_spec = resolved_spec.model_copy(update={
        "resources": api.Resources(gpus=0, cpu=prep.cpu, memory=prep.memory, shm_size=res.shm_size,
                                   priority_class_name=res.priority_class_name,
                                   **({"node_selector": prep.node_selector, "tolerations": prep.tolerations}
                                      if own_placement else
                                      {"node_selector": res.node_selector, "tolerations": res.tolerations,
                                       "affinity": res.affinity})),
        "queue_name": None, "workload_priority_class_name": None})
    manifest = job(body, cpu_spec, settings, suspend=False, gpu=gpu)
    manifest["metadata"]["name"] = prepare_job_name(body["metadata"]["name"])
    stage = {contract.LABEL_STAGE: contract.STAGE_PREPARE}
    manifest["metadata"]["labels"].update(stage)
    template = manifest["spec"]["template"]
    template["metadata"]["labels"].update(stage)
    template["spec"]["containers"][0]["command"] = ["kubetune", "prepare", "--spec", contract.SPEC_FILE]
    return manifest


def ttl_patch(job: dict[str, Any] | None, spec: api.FineTuneJobSpec | api.MergeJobSpec) -> dict[str, Any] | None:
    """The Job patch that turns on ``spec.ttlSecondsAfterFinished``, or None when there is nothing
    to do. Only called once the terminal status is written: until then the Job is the only record
    of how the run ended, and deleting it early would make a level-based operator run it again."""
    ttl = spec.ttl_seconds_after_finished
    if job is None or ttl is None or (job.get("spec") or {}).get("ttlSecondsAfterFinished") == ttl:
        return None
    return {"spec": {"ttlSecondsAfterFinished": ttl}}


def initial_suspend(spec: api.FineTuneJobSpec | api.MergeJobSpec) -> bool:
    """Create the Job suspended when the user asked for it or when Kueue is to admit it."""
    return bool(getattr(spec, "suspend", False) or spec.queue_name)


def merge_job(body: dict[str, Any], spec: api.FineTuneJobSpec) -> dict[str, Any]:
    """The MergeJob a FineTuneJob with ``spec.merge.enabled`` creates once training succeeded."""
    meta = body["metadata"]
    merge = spec.merge or api.MergeAfterTraining(enabled=True)
    output = merge.output.uri if merge.output else spec.output.uri.rstrip("/") + "/merged"
    mj_spec = api.MergeJobSpec(
        source=api.MergeSource.model_validate({"fineTuneJobRef": {"name": meta["name"]}}),
        dtype=merge.dtype,
        output=api.S3Output(uri=output),
        storage=spec.storage,
        image=spec.image,
        queue_name=spec.queue_name,
        workload_priority_class_name=spec.workload_priority_class_name,
        pod=spec.pod,
        model_cache=spec.model_cache,
        resources=api.Resources(
            gpus=0,
            cpu=spec.resources.cpu,
            memory=spec.resources.memory,
            node_selector=spec.resources.node_selector,
            tolerations=spec.resources.tolerations,
            priority_class_name=spec.resources.priority_class_name,
        ),
    )
    md = _metadata(body, merge_job_name(meta["name"]))
    md["labels"] = {k: v for k, v in md["labels"].items() if not k.startswith("app.kubernetes.io/component")}
    md["labels"].update({"app.kubernetes.io/component": "merge", contract.LABEL_KIND: "MergeJob"})
    return {"apiVersion": api.API_VERSION, "kind": "MergeJob", "metadata": md, "spec": mj_spec.to_wire()}


# ----------------------------------------------------------------------------------------------
# MergeJob resolution
# ----------------------------------------------------------------------------------------------


def adapter_uri(ftj: dict[str, Any]) -> str:
    """A succeeded FineTuneJob's adapter (status.adapterUri), for the jobs that build on it."""
    adapter = (ftj.get("status") or {}).get("adapterUri")
    if not adapter:
        raise ValueError(f"FineTuneJob {ftj['metadata']['name']} has no status.adapterUri")
    return str(adapter)


def resolve_adapter_from(spec: api.FineTuneJobSpec, ftj: dict[str, Any] | None) -> api.FineTuneJobSpec:
    """The FineTuneJobSpec the pods get for ``model.adapterFrom.fineTuneJobRef``: that job's adapter
    uri. Its base must be this job's (name and revision, or uri): an adapter fits only its base."""
    ref = spec.model.adapter_from
    if ref is None or ref.fine_tune_job_ref is None:
        return spec
    if ftj is None:
        raise ValueError("the referenced FineTuneJob is needed to resolve model.adapterFrom")
    theirs = api.FineTuneJobSpec.model_validate(ftj["spec"]).model
    ours = spec.model
    if (theirs.name, theirs.uri, theirs.revision) != (ours.name, ours.uri, ours.revision):
        raise ValueError(f"model.adapterFrom: FineTuneJob {ref.fine_tune_job_ref.name} trained its adapter on "
                         f"{theirs.display()}, this job's base is {ours.display()}: an adapter fits only its base")
    model = ours.model_copy(update={"adapter_from": api.AdapterFrom(uri=adapter_uri(ftj))})
    return spec.model_copy(update={"model": model})


def resolve_merge_spec(spec: api.MergeJobSpec, ftj: dict[str, Any] | None) -> api.MergeJobSpec:
    """The MergeJobSpec the merge container gets: a concrete ``source.adapterUri``, the base model
    and storage defaulted from the FineTuneJob. ``ftj`` must have succeeded (status.adapterUri)."""
    if spec.source.fine_tune_job_ref is None:
        return spec
    if ftj is None:
        raise ValueError("the referenced FineTuneJob is needed to resolve the MergeJob")
    ft_spec = api.FineTuneJobSpec.model_validate(ftj["spec"])
    adapter = adapter_uri(ftj)
    base = spec.source.base_model or ft_spec.model.model_copy(update={"adapter_from": None})  # a chained job's
    source = api.MergeSource(adapter_uri=adapter, base_model=base)  # adapter already holds the one it continued
    return spec.model_copy(update={"source": source, "storage": spec.storage or ft_spec.storage})
