"""The kubetune API: FineTuneJob and MergeJob, group ``kubetune.dev``, version ``v1alpha1``.

This module is the single source of truth. The CRDs in ``crds/`` (and the chart's copy) are
generated from these models by ``kubetune crds``; the operator and the trainer both validate
with them. Field names are camelCase on the wire (``lora.targetModules``) and snake_case in
Python (``lora.target_modules``).

Rules that the CRD schema enforces through CEL (``x-kubernetes-validations``) are enforced here
too, by model validators, so ``kubetune run`` and the trainer reject the same manifests the
API server rejects.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

GROUP = "kubetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

S3_URI_PATTERN = r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/[^\s]*)?$"
# http(s) endpoint without user-info: credentials never travel inline.
ENDPOINT_PATTERN = r"^https?://[^@/\s]+(/[^@\s]*)?$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$"
RESOURCE_NAME_PATTERN = r"^([a-z0-9.\-]+/)?[a-zA-Z0-9]([-a-zA-Z0-9_.]*[a-zA-Z0-9])?$"

S3Uri = Annotated[str, Field(pattern=S3_URI_PATTERN, max_length=1024)]
Dtype = Literal["bfloat16", "float16", "float32"]
# Nested objects whose fields all have defaults default to {} in the CRD, so the API server fills
# their defaults in too.
EMPTY_DEFAULT: dict[str, Any] = {"default": {}}
Phase = Literal["Pending", "Running", "Succeeded", "Failed", "Suspended"]
# status.stage is a short phrase; the pod's reporter cuts longer ones so the API server accepts them.
STAGE_MAX_LENGTH = 256


def cel(rule: str, message: str, **extra: str) -> dict[str, str]:
    """One ``x-kubernetes-validations`` entry."""
    return {"rule": rule, "message": message, **extra}


class ApiModel(BaseModel):
    """Base: camelCase aliases on the wire, unknown fields rejected, validated on assignment."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=True,
        use_attribute_docstrings=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The camelCase JSON form, without unset optional fields."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def _one_of(obj: Any, a: str, b: str, what: str, required: bool = True) -> None:
    have_a, have_b = getattr(obj, a) is not None, getattr(obj, b) is not None
    wire_a, wire_b = to_camel(a), to_camel(b)
    if have_a and have_b:
        raise ValueError(f"{what}: set exactly one of {wire_a} and {wire_b}, not both")
    if required and not (have_a or have_b):
        raise ValueError(f"{what}: set exactly one of {wire_a} and {wire_b}")


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------


class SecretKeyRef(ApiModel):
    """A key in a Secret of the job's namespace."""

    name: str = Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)
    """Name of the Secret, in the same namespace as the job."""
    key: str = Field(min_length=1, max_length=253)
    """Key inside the Secret."""


class TokenSecretRef(ApiModel):
    """A Secret holding an access token."""

    name: str = Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)
    """Name of the Secret, in the same namespace as the job."""
    key: str = Field(default="token", min_length=1, max_length=253)
    """Key inside the Secret that holds the token."""


class LocalObjectRef(ApiModel):
    """A reference to an object in the same namespace."""

    name: str = Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)
    """Name of the object (same namespace)."""


class AdapterFrom(ApiModel):
    """A trained adapter to continue (chaining: an SFT run, then DPO on its adapter)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("has(self.fineTuneJobRef) != has(self.uri)",
                    "model.adapterFrom: set exactly one of fineTuneJobRef and uri")
            ]
        }
    )

    fine_tune_job_ref: LocalObjectRef | None = Field(default=None, alias="fineTuneJobRef")
    """A FineTuneJob in the same namespace: its adapter, once it succeeded (the job waits for it)."""
    uri: S3Uri | None = None
    """s3:// folder of a PEFT adapter (a kubetune adapter, or any LoRA adapter of this base)."""

    @model_validator(mode="after")
    def _exactly_one(self) -> AdapterFrom:
        _one_of(self, "fine_tune_job_ref", "uri", "model.adapterFrom")
        return self


class ModelSource(ApiModel):
    """Where the base model comes from: a Hugging Face id or an s3:// folder."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("has(self.name) != has(self.uri)", "set exactly one of model.name and model.uri")
            ]
        }
    )

    name: str | None = Field(default=None, min_length=1, max_length=256)
    """Hugging Face model id, e.g. meta-llama/Llama-3.2-1B (needs a reachable or mirrored hub)."""
    uri: S3Uri | None = None
    """s3:// folder holding a model saved with save_pretrained (config, weights, tokenizer)."""
    revision: str | None = Field(default=None, max_length=256)
    """Hub revision (branch, tag or commit) when loading by name."""
    trust_remote_code: bool = False
    """Allow the model's own Python code to run. Leave false unless you trust the repository."""
    secret_ref: TokenSecretRef | None = None
    """Secret with a Hugging Face token (key 'token' by default) for gated or private models."""
    adapter_from: AdapterFrom | None = None
    """Continue training this adapter instead of a new one (FineTuneJob only): e.g. DPO after SFT. The
    policy starts from it; for DPO the reference is the same base with the adapter as it was at the
    start (one copy of the base in memory). lora's r and targets are the adapter's own."""

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSource:
        _one_of(self, "name", "uri", "model")
        return self

    def display(self) -> str:
        return self.name or self.uri or ""


class StorageSecretRef(ApiModel):
    """A Secret with S3 credentials."""

    name: str = Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)
    """Name of the Secret, in the same namespace as the job."""
    access_key_id_key: str = Field(default="AWS_ACCESS_KEY_ID", min_length=1)
    """Key of the access key id inside the Secret."""
    secret_access_key_key: str = Field(default="AWS_SECRET_ACCESS_KEY", min_length=1)
    """Key of the secret access key inside the Secret."""


class Storage(ApiModel):
    """Object storage for models, datasets, checkpoints and results (any S3-compatible endpoint)."""

    endpoint: str | None = Field(default=None, pattern=ENDPOINT_PATTERN, max_length=1024)
    """S3 endpoint URL, e.g. http://minio.storage:9000. Empty means AWS S3. No credentials in the URL."""
    region: str = Field(default="us-east-1", min_length=1, max_length=64)
    """S3 region."""
    addressing_style: Literal["path", "virtual", "auto"] = "path"
    """Bucket addressing: path style works with MinIO and most S3-compatible servers."""
    secret_ref: StorageSecretRef | None = None
    """Secret holding the credentials. Credentials are only ever taken from a Secret, never inline."""
    checksums: Literal["whenSupported", "whenRequired"] = "whenSupported"
    """When the S3 client adds checksums to requests and validates them in responses: whenSupported
    (the AWS SDK default, a CRC32 on every upload) or whenRequired (only where the operation requires
    one). Use whenRequired for S3-compatible servers that reject the newer checksum headers, such as
    older Ceph RGW and MinIO releases."""


class Toleration(ApiModel):
    """A Kubernetes toleration (core/v1 Toleration)."""

    key: str | None = None
    """Taint key the toleration applies to; empty matches all keys."""
    operator: Literal["Exists", "Equal"] | None = None
    """Exists or Equal (default Equal)."""
    value: str | None = None
    """Taint value the toleration matches."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to match; empty matches all effects."""
    toleration_seconds: int | None = Field(default=None, ge=0)
    """How long a NoExecute taint is tolerated."""


class Resources(ApiModel):
    """What the pod asks for and where it may run."""

    gpus: int = Field(default=1, ge=0, le=64)
    """Number of GPUs (0 runs on CPU: fine for small models and merges)."""
    gpu_resource: str = Field(default="nvidia.com/gpu", pattern=RESOURCE_NAME_PATTERN, max_length=253)
    """Extended resource name of the GPU, e.g. nvidia.com/gpu or amd.com/gpu."""
    cpu: str | None = Field(default=None, pattern=QUANTITY_PATTERN)
    """CPU request and limit, e.g. '8' or '500m'."""
    memory: str | None = Field(default=None, pattern=QUANTITY_PATTERN)
    """Memory request and limit, e.g. '64Gi'."""
    shm_size: str = Field(default="2Gi", pattern=QUANTITY_PATTERN)
    """Size of the in-memory /dev/shm (data loader workers need it)."""
    node_selector: dict[str, str] | None = None
    """Node labels the pod must match."""
    tolerations: list[Toleration] | None = None
    """Tolerations, e.g. for tainted GPU nodes."""
    affinity: dict[str, Any] | None = Field(
        default=None, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True}
    )
    """A core/v1 Affinity, copied into the pod as is."""
    priority_class_name: str | None = Field(default=None, pattern=DNS_SUBDOMAIN_PATTERN)
    """PriorityClass of the pod."""
    gpu_memory: str | None = Field(default=None, pattern=QUANTITY_PATTERN)
    """Memory of each GPU, e.g. '80Gi', for the check that the run fits before any GPU pod starts (FineTuneJob only).
    Default: the smallest nvidia.com/gpu.memory label (GPU feature discovery) of the nodes the job
    may run on, when the operator may read nodes; unknown skips the check."""
    nodes: int = Field(default=1, ge=1, le=64)
    """Pods the run spans, each with `gpus` GPUs and one training rank per GPU (FineTuneJob only).
    More than 1 runs an Indexed Job of this many pods that meet through a headless Service; they
    start, fail and retry together and resume from the last checkpoint."""


# Names the operator owns in every pod: a job's own (spec.pod) may not replace them.
RESERVED_VOLUMES = ("spec", "work", "cache", "tmp", "dshm", "model-cache")
RESERVED_MOUNT_PATHS = ("/etc/kubetune", "/var/kubetune/work", "/var/kubetune/cache", "/var/kubetune/model-cache",
                        "/tmp", "/dev/shm")
RESERVED_LABEL_PREFIXES = ("kubetune.dev/", "app.kubernetes.io/", "batch.kubernetes.io/", "kueue.x-k8s.io/")
PRESERVE: dict[str, Any] = {"x-kubernetes-preserve-unknown-fields": True}


class EnvVar(ApiModel):
    """An environment variable of the container (core/v1 EnvVar)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("!(has(self.value) && has(self.valueFrom))", "set value or valueFrom, not both"),
                cel("!self.name.startsWith('KUBETUNE_')", "KUBETUNE_* variables are the operator's"),
            ]
        }
    )

    name: str = Field(pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$", max_length=256)
    """Variable name."""
    value: str | None = None
    """Its value."""
    value_from: dict[str, Any] | None = Field(default=None, json_schema_extra=PRESERVE)
    """A core/v1 EnvVarSource (secretKeyRef, configMapKeyRef, fieldRef, resourceFieldRef), as is."""

    @model_validator(mode="after")
    def _checks(self) -> EnvVar:
        if self.value is not None and self.value_from is not None:
            raise ValueError("set value or valueFrom, not both")
        if self.name.startswith("KUBETUNE_"):
            raise ValueError("KUBETUNE_* variables are the operator's")
        return self


class Volume(BaseModel):
    """A core/v1 Volume: its name, and its source as is (configMap, secret, persistentVolumeClaim,
    projected, csi, ...)."""

    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True,
                              json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})

    name: str = Field(pattern=DNS_LABEL_PATTERN, max_length=63)
    """Volume name (not one of the operator's: spec, work, cache, tmp, dshm, model-cache)."""


class VolumeMount(ApiModel):
    """A core/v1 VolumeMount of the container."""

    name: str = Field(pattern=DNS_LABEL_PATTERN, max_length=63)
    """Name of the volume."""
    mount_path: str = Field(min_length=1, max_length=4096)
    """Where it is mounted (not over /etc/kubetune, /var/kubetune/..., /tmp, /dev/shm)."""
    read_only: bool | None = None
    """Mount read-only."""
    sub_path: str | None = None
    """A path inside the volume to mount instead of its root."""


class PodSettings(ApiModel):
    """What the pod carries for the platform it runs on: pull secrets, a mesh or autoscaler
    annotation, a runtime class, workload identity (its own ServiceAccount), the UID a restricted
    platform assigns (OpenShift), extra volumes and env. The operator's defaults (chart value
    podDefaults) come first; a job's own settings add to them and win where both set one."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("!has(self.labels) || self.labels.all(k, " + " && ".join(
                    f"!k.startsWith('{p}')" for p in RESERVED_LABEL_PREFIXES) + ")",
                    "spec.pod.labels may not use the prefixes kubetune.dev/, app.kubernetes.io/, "
                    "batch.kubernetes.io/ or kueue.x-k8s.io/ (the operator's and Kueue's)"),
                cel("!has(self.volumeMounts) || self.volumeMounts.all(m, !(m.mountPath in "
                    + str(list(RESERVED_MOUNT_PATHS)) + "))",
                    "spec.pod.volumeMounts may not mount over " + ", ".join(RESERVED_MOUNT_PATHS)),
                cel("!has(self.volumes) || self.volumes.all(v, !(v.name in "
                    + str(list(RESERVED_VOLUMES)) + "))",
                    "spec.pod.volumes may not be named " + ", ".join(RESERVED_VOLUMES) + " (the operator's)"),
            ]
        }
    )

    labels: dict[str, str] | None = Field(default=None, max_length=64)
    """Extra pod labels (not the operator's own prefixes)."""
    annotations: dict[str, str] | None = Field(default=None, max_length=64)
    """Extra pod annotations, e.g. sidecar.istio.io/inject: "false" or
    cluster-autoscaler.kubernetes.io/safe-to-evict: "false"."""
    image_pull_secrets: list[Annotated[str, Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)]] | None = Field(
        default=None, max_length=16)
    """Secrets (in the job's namespace) to pull the image with."""
    runtime_class_name: str | None = Field(default=None, pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)
    """RuntimeClass of the pod (e.g. nvidia)."""
    service_account_name: str | None = Field(default=None, pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)
    """Run the pod as this ServiceAccount of the job's namespace instead of the one the operator makes
    for the job: workload identity (IRSA, GKE or Azure Workload Identity) then gives it storage
    credentials, and storage.secretRef can be left out. The operator binds the job's progress-channel
    Role to it, so it may still patch this job's status, and nothing more of kubetune's."""
    run_as_user: int | None = Field(default=None, ge=1)
    """UID of the container (default: the operator's --run-as-user, 1000; unset there on platforms
    that assign one, such as OpenShift)."""
    run_as_group: int | None = Field(default=None, ge=0)
    """GID of the container."""
    fs_group: int | None = Field(default=None, ge=0)
    """Group that owns the pod's volumes."""
    env: list[EnvVar] | None = Field(default=None, max_length=128)
    """Extra environment (not KUBETUNE_*); replaces a variable of the operator's with the same name."""
    volumes: list[Volume] | None = Field(default=None, max_length=32)
    """Extra core/v1 Volumes (not named like the operator's), e.g. a projected ServiceAccount token."""
    volume_mounts: list[VolumeMount] | None = Field(default=None, max_length=32)
    """Extra mounts of the container (not over the operator's paths)."""

    @model_validator(mode="after")
    def _reserved(self) -> PodSettings:
        for key in self.labels or {}:
            if key.startswith(RESERVED_LABEL_PREFIXES):
                raise ValueError("spec.pod.labels may not use the prefixes kubetune.dev/, app.kubernetes.io/, "
                                 "batch.kubernetes.io/ or kueue.x-k8s.io/ (the operator's and Kueue's)")
        for mount in self.volume_mounts or []:
            if mount.mount_path in RESERVED_MOUNT_PATHS:
                raise ValueError("spec.pod.volumeMounts may not mount over " + ", ".join(RESERVED_MOUNT_PATHS))
        for volume in self.volumes or []:
            if volume.name in RESERVED_VOLUMES:
                raise ValueError("spec.pod.volumes may not be named " + ", ".join(RESERVED_VOLUMES) +
                                 " (the operator's)")
        return self


class ModelCache(ApiModel):
    """Where base models are kept between pods, by content."""

    claim_name: str = Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)
    """A PersistentVolumeClaim of the job's namespace (ReadWriteMany when jobs run on several nodes
    at once). An s3:// model is stored there once per content (its objects' ETags and sizes) and read
    by every later pod: retries, resumes, later jobs and MergeJobs; a hub model goes to the Hugging
    Face cache on it. Concurrent jobs are safe: a download lands under a temporary name and is
    renamed into place whole."""


class JobControls(ApiModel):
    """Fields shared by both kinds that control the Kubernetes Job."""

    image: str | None = Field(default=None, min_length=1, max_length=1024)
    """Container image; empty uses the operator's default trainer image."""
    active_deadline_seconds: int | None = Field(default=None, ge=1)
    """Fail the job when it has run this long (all attempts together)."""
    backoff_limit: int = Field(default=3, ge=0, le=50)
    """Retries after a failed pod; each retry resumes from the last checkpoint."""
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0)
    """Delete the Job and its pods this long after it finishes; the resource and its status stay.
    The operator sets it on the Job only once it has recorded the end in the status, so a Job
    deleted early can never make it run the work again."""
    startup_timeout_seconds: int | None = Field(default=None, ge=30, le=604800)
    """Fail the job when its pod has not started running this long after it was created
    (ImagePullBackOff, CreateContainerConfigError, Unschedulable, ...), which frees its GPU and
    queue quota. Empty: the operator's default (--startup-timeout, chart value startupTimeoutSeconds)."""
    pod: PodSettings | None = None
    """Pod settings for the platform: labels, annotations, imagePullSecrets, runtimeClassName,
    serviceAccountName (workload identity), UID/GID, extra env and volumes."""
    queue_name: str | None = Field(default=None, pattern=DNS_SUBDOMAIN_PATTERN)
    """Kueue LocalQueue: the Job is created suspended and Kueue admits it (the MergeJob that
    spec.merge creates inherits it). The Workload's state shows in the status: why it waits
    (Kueue's own message), and a preemption (reason Preempted, and an Event)."""
    workload_priority_class_name: str | None = Field(default=None, pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)
    """Kueue WorkloadPriorityClass of the job (the kueue.x-k8s.io/priority-class label): its place in
    the queue and which jobs it may preempt (the MergeJob that spec.merge creates inherits it)."""
    model_cache: ModelCache | None = None
    """Keep the base model on a volume shared by retries and later jobs instead of downloading it
    in every pod (default: the operator's --model-cache-claim, chart value modelCache.claimName)."""


# ----------------------------------------------------------------------------------------------
# FineTuneJob
# ----------------------------------------------------------------------------------------------


class Quantization(ApiModel):
    """How the frozen base model is loaded. The default is QLoRA: 4-bit NF4, double quant, bf16."""

    bits: Literal["auto", 4, 8, 16] = Field(default=4, json_schema_extra={"x-kubernetes-int-or-string": True})
    """4 or 8 loads the base through bitsandbytes (QLoRA); 16 is plain LoRA on an unquantized base
    (faster, needs ~4x the weight memory); auto: 16 when the prepare stage's estimate says it fits the
    GPUs the job gets with 10% to spare, else 4 (status.memory says which)."""
    type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type: nf4 (NormalFloat, the QLoRA default) or fp4."""
    double_quant: bool = True
    """Quantize the quantization constants too (saves ~0.4 bit per parameter)."""
    compute_dtype: Dtype = "bfloat16"
    """Dtype the dequantized weights are computed in."""


class Lora(ApiModel):
    """The LoRA adapter (peft LoraConfig)."""

    r: int = Field(default=16, gt=0, le=1024)
    """Rank of the update matrices."""
    alpha: int = Field(default=32, gt=0, le=4096)
    """Scaling numerator: the update is scaled by alpha/r (alpha/sqrt(r) with useRslora)."""
    dropout: float = Field(default=0.05, ge=0, lt=1)
    """Dropout on the LoRA input."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases are trained."""
    target_modules: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=lambda: ["all-linear"], min_length=1, json_schema_extra={"default": ["all-linear"]}
    )
    """Module names to adapt (e.g. [q_proj, v_proj]) or [all-linear]."""
    use_rslora: bool = False
    """Rank-stabilized LoRA scaling."""
    modules_to_save: list[str] | None = None
    """Extra modules trained in full and saved with the adapter (e.g. [lm_head])."""


class EvalSplit(ApiModel):
    """Held-out data: a named split or a fraction of the training split."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "has(self.split) != has(self.fraction)",
                    "set exactly one of dataset.eval.split and dataset.eval.fraction",
                )
            ]
        }
    )

    split: str | None = Field(default=None, min_length=1)
    """Name of an evaluation split of the dataset."""
    fraction: float | None = Field(default=None, gt=0, lt=1)
    """Fraction of the training split held out for evaluation (seeded)."""
    max_samples: int | None = Field(default=1000, ge=1)
    """At most this many evaluation samples (a seeded random subset), so evaluation measures without
    dominating the run. Unset it (null) to evaluate on the whole split."""

    @model_validator(mode="after")
    def _exactly_one(self) -> EvalSplit:
        _one_of(self, "split", "fraction", "dataset.eval")
        return self


class Dataset(ApiModel):
    """Training data and how each sample becomes text."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.format != 'template' || has(self.template)",
                    "dataset.template is required when dataset.format is template",
                ),
            ]
        }
    )

    source: Literal["deeplake", "huggingface", "jsonl", "parquet"]
    """Kind of dataset: deeplake, huggingface (save_to_disk folder or hub id), jsonl or parquet."""
    uri: str = Field(min_length=1, max_length=2048)
    """Where it is: s3://bucket/path, a local path, hub:// (Deep Lake) or a hub id (huggingface)."""
    split: str = Field(default="train", min_length=1)
    """Split to train on (huggingface datasets with several splits)."""
    eval: EvalSplit | None = None
    """Held-out evaluation data."""
    format: Literal["text", "template", "promptCompletion", "messages", "preference", "feedback"] = "text"
    """text: one column used as is; template: a format string over columns; promptCompletion:
    loss on the completion only; messages: a chat conversation rendered by the chat template;
    preference (methods dpo and kto): a prompt and a chosen and a rejected answer, each a string or a
    list of messages (rendered by the chat template); feedback (method kto): a prompt, one completion
    and a boolean label (true: desirable), strings or lists of messages."""
    text_field: str = Field(default="text", min_length=1)
    """Column used by the text format."""
    template: str | None = Field(default=None, min_length=1, max_length=65536)
    """Python format string over columns, e.g. 'Question: {prompt}\\n\\nAnswer: {response}'."""
    prompt_field: str = Field(default="prompt", min_length=1)
    """Prompt column of the promptCompletion format."""
    completion_field: str = Field(default="completion", min_length=1)
    """Completion column of the promptCompletion format."""
    chosen_field: str = Field(default="chosen", min_length=1)
    """Preferred answer column of the preference format."""
    rejected_field: str = Field(default="rejected", min_length=1)
    """Dispreferred answer column of the preference format."""
    label_field: str = Field(default="label", min_length=1)
    """Column of the feedback format: true when the completion is desirable, false when not."""
    messages_field: str = Field(default="messages", min_length=1)
    """Column of the messages format: a list of messages (or a JSON string of one), each with a role
    (system, developer, user, assistant or tool) and content; tool_calls, name, tool_call_id and
    reasoning_content/thinking are kept. An assistant message with tool_calls may have null content."""
    tools_field: str = Field(default="tools", min_length=1)
    """Column of the messages format with the tools offered in each conversation, used when present:
    a list of JSON-schema function specs (or a JSON string of one), passed to the chat template."""
    chat_template: str | None = Field(default=None, min_length=1, max_length=262144)
    """Jinja chat template replacing the tokenizer's, for training (messages format) and in the saved
    adapter's tokenizer. Mark assistant turns with {% generation %} ... {% endgeneration %} to train
    on them only; without the markers the loss covers whole conversations."""
    secret_ref: TokenSecretRef | None = None
    """Secret with a token for hub:// (Deep Lake) or a private hub dataset."""

    @model_validator(mode="after")
    def _template_needs_template(self) -> Dataset:
        if self.format == "template" and self.template is None:
            raise ValueError("dataset.template is required when dataset.format is template")
        return self


class Watchdog(ApiModel):
    """Ends a run that cannot produce a useful result, keeping its last good checkpoint."""

    divergence_factor: float = Field(default=5.0, gt=1)
    """Diverged when a logged training loss exceeds this many times the first logged loss (a NaN or
    infinite loss, or non-finite adapter weights at a checkpoint, always count)."""
    stall_seconds: int = Field(default=1800, ge=5)
    """Stalled when no training or evaluation step ends for this long (hung GPU, storage or collective)."""


class EarlyStopping(ApiModel):
    """Stop training when the evaluation loss stops improving."""

    patience: int = Field(default=3, ge=1, le=1000)
    """Evaluations in a row without improvement before training stops."""
    min_delta: float = Field(default=0.0, ge=0)
    """How much lower than the best so far an eval loss must be to count as an improvement."""


class Training(ApiModel):
    """Optimisation settings (trl SFTConfig)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "has(self.maxSteps) != has(self.epochs)",
                    "set exactly one of training.maxSteps and training.epochs",
                )
            ]
        }
    )

    max_steps: int | None = Field(default=None, gt=0)
    """Number of optimizer steps (exclusive with epochs)."""
    epochs: float | None = Field(default=None, gt=0, le=1000)
    """Number of passes over the data (exclusive with maxSteps)."""
    learning_rate: float = Field(default=2e-4, gt=0, le=1)
    """Peak learning rate."""
    lr_scheduler: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
    ] = "cosine"
    """Learning-rate schedule."""
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    """Fraction of steps spent warming up."""
    weight_decay: float = Field(default=0.0, ge=0, lt=1)
    """AdamW weight decay."""
    max_grad_norm: float = Field(default=0.3, gt=0)
    """Gradient clipping norm (0.3 in the QLoRA paper)."""
    batch_size: int = Field(default=4, ge=1, le=4096)
    """Sequences per device per step."""
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=4096)
    """Micro-batches accumulated per optimizer step."""
    max_length: int = Field(default=1024, ge=8, le=262144)
    """Tokens per packed sequence (or truncation length without packing)."""
    packing: Literal["none", "bfd", "bfd_split", "wrapped"] = "bfd"
    """bfd: best-fit packing, no attention across samples, a sample longer than maxLength is
    truncated; bfd_split: as bfd, but a longer sample is split into maxLength pieces packed on their
    own (every token is trained; a piece does not see the one before it); wrapped: the classic
    constant-length packing (samples attend to each other, nothing is cut); none: one sample per row,
    padded, truncated at maxLength."""
    max_truncated_fraction: float = Field(default=0.05, ge=0, le=1)
    """Fail before training when more than this fraction of the training samples is longer than
    maxLength and would be truncated (packing none or bfd); the error names the rows. 0 allows no
    truncation; 1 accepts any. With bfd_split or wrapped nothing is truncated."""
    bf16: bool = True
    """Train in bfloat16 mixed precision where the hardware supports it."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass (non-reentrant): less memory, ~20% slower."""
    optimizer: Literal[
        "auto", "adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "paged_adamw_32bit",
        "adamw_8bit", "adafactor", "sgd",
    ] = "auto"
    """auto: paged_adamw_32bit on GPU, adamw_torch on CPU."""
    seed: int = 42
    """Seed for data order, LoRA init and dropout."""
    logging_steps: int = Field(default=10, ge=1)
    """Report loss and progress every this many steps."""
    eval_steps: int | None = Field(default=None, ge=1)
    """Evaluate every this many steps when eval data exists (default: 5 evaluations a run, every 20%
    of the steps). The run always ends with one evaluation."""
    save_steps: int = Field(default=100, ge=1)
    """Upload a checkpoint every this many steps; a retried pod resumes from the latest."""
    keep_checkpoints: int = Field(default=2, ge=1, le=100)
    """Number of checkpoints kept in storage."""
    watchdog: Watchdog = Field(default_factory=Watchdog, json_schema_extra=EMPTY_DEFAULT)
    """Stop a run that diverged or stalled instead of burning GPU hours."""
    early_stopping: EarlyStopping | None = None
    """Stop when the evaluation loss stops improving (needs dataset.eval)."""
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"
    """How the ranks of a job with more than one (resources.gpus x resources.nodes > 1) share the
    work, under torchrun: ddp keeps a whole 4-bit base on every rank and averages the adapter's
    gradients; fsdp shards the base over the ranks (4-bit weights stored in the compute dtype, the
    FSDP-QLoRA recipe) for a model that does not fit one GPU; auto is ddp unless the base's 4-bit
    weights take more than half of a GPU's memory. Each rank takes batchSize x
    gradientAccumulationSteps sequences a step: the global batch grows with the ranks."""
    keep_best: bool = False
    """Publish the adapter of the best evaluation (the last one that improved the eval loss by more
    than earlyStopping.minDelta) instead of the last step's, and never delete its checkpoint (needs
    dataset.eval)."""

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> Training:
        _one_of(self, "max_steps", "epochs", "training")
        return self


class S3Output(ApiModel):
    """Where results go."""

    uri: S3Uri
    """s3:// folder for results, e.g. s3://models/llama-qlora/run-1."""


class WandbTracking(ApiModel):
    """Weights & Biases experiment tracking."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.mode != 'online' || has(self.secretRef)",
                    "tracking.wandb.secretRef (the API key) is required when mode is online",
                )
            ]
        }
    )

    project: str = Field(min_length=1, max_length=128)
    """W&B project."""
    entity: str | None = Field(default=None, min_length=1, max_length=128)
    """W&B entity (team or user)."""
    mode: Literal["online", "offline", "disabled"] = "online"
    """offline writes the run locally and uploads it with the artifacts (no network needed)."""
    secret_ref: SecretKeyRef | None = None
    """Secret key holding WANDB_API_KEY."""
    host: str | None = Field(default=None, pattern=ENDPOINT_PATTERN)
    """Self-hosted W&B server URL."""

    @model_validator(mode="after")
    def _online_needs_key(self) -> WandbTracking:
        if self.mode == "online" and self.secret_ref is None:
            raise ValueError("tracking.wandb.secretRef (the API key) is required when mode is online")
        return self


class Tracking(ApiModel):
    """Experiment tracking."""

    wandb: WandbTracking | None = None
    """Report metrics to Weights & Biases."""


class MergeAfterTraining(ApiModel):
    """Create a MergeJob when training succeeds."""

    enabled: bool = False
    """Merge the adapter into its base model once training succeeds."""
    dtype: Dtype = "bfloat16"
    """Dtype the base is reloaded in for the merge (never 4-bit)."""
    output: S3Output | None = None
    """Where the merged model goes (default: <output.uri>/merged)."""


class Prepare(ApiModel):
    """The prepare stage: the data checked and tokenized on CPUs before any GPU is asked for."""

    mode: Literal["separate", "inline"] = "separate"
    """``separate``: a CPU-only Job (no GPU request, not queued) downloads the tokenizer, checks every
    row, tokenizes and stores the result, and only when it succeeds is the GPU Job created, which
    reads the stored data. Bad or missing input then fails the job without any GPU pod. ``inline``:
    one pod does both (a tiny job, or a cluster where an extra pod is not worth it)."""
    cpu: str = Field(default="1", pattern=QUANTITY_PATTERN)
    """CPU request and limit of the prepare pod."""
    memory: str = Field(default="4Gi", pattern=QUANTITY_PATTERN)
    """Memory request and limit of the prepare pod."""
    node_selector: dict[str, str] | None = None
    """Node labels the prepare pod must match, e.g. a CPU node pool. When neither this nor
    tolerations is set, the prepare pod is placed like the GPU pod (resources' nodeSelector,
    tolerations and affinity), without its GPUs."""
    tolerations: list[Toleration] | None = None
    """Tolerations of the prepare pod (see nodeSelector)."""


class Dpo(ApiModel):
    """Direct Preference Optimization (TRL's DPOTrainer): the policy learns to prefer each pair's
    chosen answer over its rejected one, relative to the reference (the base with the adapter as it
    was at the start: model.adapterFrom's, or none)."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        cel("!has(self.labelSmoothing) || self.labelSmoothing < 0.5", "dpo.labelSmoothing must be below 0.5")]})

    beta: float = Field(default=0.1, gt=0, le=10)
    """How far the policy may move from the reference (higher: less)."""
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "bco_pair", "sppo_hard", "apo_zero", "apo_down",
                       "sigmoid_norm"] = "sigmoid"
    """sigmoid: the DPO paper's loss; ipo, hinge, robust (with labelSmoothing), bco_pair, sppo_hard,
    apo_zero, apo_down, sigmoid_norm: TRL's variants."""
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    """robust: the probability that a pair's preference is flipped (below 0.5)."""
    max_prompt_length: int | None = Field(default=None, ge=1)
    """Longest prompt in tokens; a longer one fails the run before training, naming the rows.
    Default: training.maxLength - 1 (every pair keeps at least one answer token)."""

    @model_validator(mode="after")
    def _smoothing(self) -> Dpo:
        if self.label_smoothing >= 0.5:
            raise ValueError("dpo.labelSmoothing must be below 0.5")
        return self


class Kto(ApiModel):
    """Kahneman-Tversky Optimization (TRL's KTOTrainer): learns from single completions labelled
    desirable or not (dataset.format feedback; preference pairs are split into one of each), relative
    to the reference (the base with the adapter as it was at the start)."""

    beta: float = Field(default=0.1, gt=0, le=10)
    """How far the policy may move from the reference (higher: less)."""
    loss_type: Literal["kto", "apo_zero_unpaired"] = "kto"
    """kto: the KTO paper's loss (estimates the KL term from mismatched completions in each batch,
    so training.batchSize must be 2 or more); apo_zero_unpaired: TRL's APO-zero, no KL term."""
    desirable_weight: float = Field(default=1.0, gt=0, le=100)
    """Weight of the desirable completions' loss (raise it when they are fewer)."""
    undesirable_weight: float = Field(default=1.0, gt=0, le=100)
    """Weight of the undesirable completions' loss. The KTO paper keeps desirable x desirableWeight
    over undesirable x undesirableWeight between 1 and 4/3."""
    max_prompt_length: int | None = Field(default=None, ge=1)
    """Longest prompt in tokens; a longer one fails the run before training, naming the rows.
    Default: training.maxLength - 1."""


class Orpo(ApiModel):
    """Odds Ratio Preference Optimization (TRL's ORPOTrainer): supervised fine-tuning on each pair's
    chosen answer plus a penalty on the odds of the rejected one, in one run and without a reference
    model (no SFT run needed first; one forward pass of the pair per step)."""

    beta: float = Field(default=0.1, gt=0, le=10)
    """Weight of the odds-ratio (preference) term next to the chosen answers' loss (the ORPO paper's
    lambda; higher: the preference counts more)."""
    max_prompt_length: int | None = Field(default=None, ge=1)
    """Longest prompt in tokens; a longer one fails the run before training, naming the rows.
    Default: training.maxLength - 1."""


class FineTuneJobSpec(JobControls):
    """A packed QLoRA supervised fine-tuning run, or preference tuning (spec.method dpo, orpo, kto)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!(has(self.training.earlyStopping) || (has(self.training.keepBest) && self.training.keepBest))"
                    " || has(self.dataset.eval)",
                    "training.earlyStopping and training.keepBest need evaluation data: set dataset.eval",
                ),
                cel(
                    "!has(self.method) || self.method != 'dpo' || (has(self.dataset.format)"
                    " && self.dataset.format == 'preference')",
                    "method dpo trains on dataset.format preference (prompt, chosen, rejected)",
                ),
                cel(
                    "!has(self.method) || self.method != 'orpo' || (has(self.dataset.format)"
                    " && self.dataset.format == 'preference')",
                    "method orpo trains on dataset.format preference (prompt, chosen, rejected)",
                ),
                cel(
                    "!has(self.method) || self.method != 'kto' || (has(self.dataset.format)"
                    " && self.dataset.format in ['feedback', 'preference'])",
                    "method kto trains on dataset.format feedback (prompt, completion, label) or preference",
                ),
                cel(
                    "!has(self.dataset.format) || !(self.dataset.format in ['feedback', 'preference'])"
                    " || (has(self.method) && self.method in ['dpo', 'orpo', 'kto'])",
                    "dataset.format preference and feedback are preference data: set method dpo, orpo or kto",
                ),
                cel(
                    "!has(self.dpo) || (has(self.method) && self.method == 'dpo')",
                    "spec.dpo configures method dpo: set method: dpo, or remove spec.dpo",
                ),
                cel(
                    "!has(self.orpo) || (has(self.method) && self.method == 'orpo')",
                    "spec.orpo configures method orpo: set method: orpo, or remove spec.orpo",
                ),
                cel(
                    "!has(self.kto) || (has(self.method) && self.method == 'kto')",
                    "spec.kto configures method kto: set method: kto, or remove spec.kto",
                ),
                cel(
                    "!has(self.method) || self.method != 'kto' || (has(self.kto) && has(self.kto.lossType)"
                    " && self.kto.lossType == 'apo_zero_unpaired') || !has(self.training)"
                    " || !has(self.training.batchSize) || self.training.batchSize >= 2",
                    "method kto estimates its KL term from the other completions of a batch: set "
                    "training.batchSize to 2 or more (or kto.lossType apo_zero_unpaired)",
                ),
                cel(
                    "!has(self.resources.nodes) || self.resources.nodes == 1 || !has(self.resources.gpus)"
                    " || self.resources.gpus >= 1",
                    "resources.nodes > 1 needs resources.gpus >= 1: every node runs one rank per GPU",
                ),
                cel(
                    "!has(self.training.distributed) || self.training.distributed != 'fsdp'"
                    " || (has(self.resources.gpus) ? self.resources.gpus : 1)"
                    " * (has(self.resources.nodes) ? self.resources.nodes : 1) > 1",
                    "training.distributed fsdp shards the model over ranks: it needs more than one "
                    "(resources.gpus x resources.nodes > 1)",
                ),
            ]
        }
    )

    method: Literal["sft", "dpo", "orpo", "kto"] = "sft"
    """sft: supervised fine-tuning on text, templates, prompt/completion pairs or conversations;
    dpo: preference tuning on prompt/chosen/rejected pairs (dataset.format preference, settings in
    spec.dpo); orpo: supervised and preference tuning in one run on the same pairs, no reference
    model (settings in spec.orpo); kto: preference tuning on completions labelled desirable or not
    (dataset.format feedback, or preference pairs split in two; settings in spec.kto). DPO and KTO
    usually continue an SFT run's adapter (model.adapterFrom); ORPO usually starts from the base."""
    dpo: Dpo | None = None
    """Settings of method dpo (defaults when unset)."""
    orpo: Orpo | None = None
    """Settings of method orpo (defaults when unset)."""
    kto: Kto | None = None
    """Settings of method kto (defaults when unset)."""
    model: ModelSource
    """Base model."""
    quantization: Quantization = Field(default_factory=Quantization, json_schema_extra=EMPTY_DEFAULT)
    """How the frozen base is loaded (default 4-bit NF4 QLoRA)."""
    lora: Lora = Field(default_factory=Lora, json_schema_extra=EMPTY_DEFAULT)
    """The LoRA adapter."""
    dataset: Dataset
    """Training data."""
    training: Training
    """Optimisation settings; one of maxSteps and epochs is required."""
    output: S3Output
    """Where the adapter, checkpoints and report go."""
    storage: Storage = Field(default_factory=Storage, json_schema_extra=EMPTY_DEFAULT)
    """Object-storage endpoint and credentials."""
    tracking: Tracking | None = None
    """Experiment tracking."""
    resources: Resources = Field(default_factory=Resources, json_schema_extra=EMPTY_DEFAULT)
    """Pod resources and placement."""
    suspend: bool = False
    """Suspend the run (the pod stops after a checkpoint; unsuspending resumes from it). The only
    field that may change after creation."""
    merge: MergeAfterTraining | None = None
    """Merge the adapter into the base when training succeeds."""
    prepare: Prepare = Field(default_factory=Prepare, json_schema_extra=EMPTY_DEFAULT)
    """The CPU prepare stage before the GPU Job (default: a separate CPU-only Job)."""

    @model_validator(mode="after")
    def _best_needs_eval(self) -> FineTuneJobSpec:
        if (self.training.early_stopping is not None or self.training.keep_best) and self.dataset.eval is None:
            raise ValueError("training.earlyStopping and training.keepBest need evaluation data: set dataset.eval")
        return self

    @model_validator(mode="after")
    def _method(self) -> FineTuneJobSpec:
        fmt = self.dataset.format
        if self.method in ("dpo", "orpo") and fmt != "preference":
            raise ValueError(f"method {self.method} trains on dataset.format preference (prompt, chosen, rejected)")
        if self.method == "kto" and fmt not in ("feedback", "preference"):
            raise ValueError("method kto trains on dataset.format feedback (prompt, completion, label) or preference")
        if fmt in ("feedback", "preference") and self.method == "sft":
            raise ValueError("dataset.format preference and feedback are preference data: set method dpo, orpo or kto")
        for name in ("dpo", "orpo", "kto"):
            if getattr(self, name) is not None and self.method != name:
                raise ValueError(f"spec.{name} configures method {name}: set method: {name}, or remove spec.{name}")
        if self.method == "kto" and self.kto_settings().loss_type == "kto" and self.training.batch_size < 2:
            raise ValueError("method kto estimates its KL term from the other completions of a batch: set "
                             "training.batchSize to 2 or more (or kto.lossType apo_zero_unpaired)")
        return self

    def dpo_settings(self) -> Dpo:
        return self.dpo or Dpo()

    def kto_settings(self) -> Kto:
        return self.kto or Kto()

    def orpo_settings(self) -> Orpo:
        return self.orpo or Orpo()

    def method_settings(self) -> Dpo | Orpo | Kto | None:
        """spec.dpo, spec.orpo or spec.kto (defaults when unset) for that method; None for sft."""
        return None if self.method == "sft" else getattr(self, f"{self.method}_settings")()

    @model_validator(mode="after")
    def _ranks(self) -> FineTuneJobSpec:
        if self.resources.nodes > 1 and self.resources.gpus < 1:
            raise ValueError("resources.nodes > 1 needs resources.gpus >= 1: every node runs one rank per GPU")
        if self.training.distributed == "fsdp" and self.world_size() < 2:
            raise ValueError("training.distributed fsdp shards the model over ranks: it needs more than one "
                             "(resources.gpus x resources.nodes > 1)")
        return self

    def world_size(self) -> int:
        """Training ranks: one per GPU on every node (one process on CPU)."""
        return max(self.resources.gpus, 1) * self.resources.nodes


class Progress(ApiModel):
    """Live training progress, reported by the trainer."""

    step: int | None = Field(default=None, ge=0)
    """Optimizer steps done."""
    total_steps: int | None = Field(default=None, ge=0)
    """Optimizer steps in the run."""
    percent: int | None = Field(default=None, ge=0, le=100)
    """Percent done."""
    epoch: float | None = None
    """Epochs done (fractional)."""
    loss: float | None = None
    """Latest training loss."""
    eval_loss: float | None = None
    """Latest evaluation loss."""
    eval_perplexity: float | None = None
    """exp(evalLoss): perplexity on the evaluation samples."""
    learning_rate: float | None = None
    """Current learning rate."""
    reward_accuracy: float | None = None
    """methods dpo and orpo: the share of pairs whose chosen answer the policy rewards above the
    rejected one (latest logged steps; 0.5 is chance)."""
    reward_margin: float | None = None
    """methods dpo, orpo and kto: mean reward of the chosen (desirable) answers minus the rejected ones."""
    reward_chosen: float | None = None
    """methods dpo, orpo and kto: mean reward of the chosen answers (dpo, kto: beta x log-ratio to the
    reference; orpo: beta x mean token log-probability)."""
    reward_rejected: float | None = None
    """methods dpo, orpo and kto: mean reward of the rejected (undesirable) answers."""
    eval_reward_accuracy: float | None = None
    """methods dpo and orpo: rewardAccuracy on the evaluation pairs."""
    eval_reward_margin: float | None = None
    """methods dpo, orpo and kto: rewardMargin on the evaluation data."""
    kl: float | None = None
    """method kto: the estimated KL divergence of the policy from the reference."""
    nll_loss: float | None = None
    """method orpo: the supervised part of the loss (the chosen answers' negative log-likelihood)."""
    log_odds_ratio: float | None = None
    """method orpo: mean log odds ratio of the chosen answer over the rejected one (above 0: the
    chosen answer is the likelier)."""
    tokens_per_second: float | None = None
    """Training throughput in tokens per second."""
    eta_seconds: int | None = Field(default=None, ge=0)
    """Estimated seconds until the end."""
    eta: str | None = None
    """Estimated time left, human readable (e.g. 12m30s)."""
    updated_at: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    """When the trainer last reported."""


class Condition(ApiModel):
    """A metav1.Condition."""

    type: str = Field(min_length=1, max_length=316)
    """Condition type, e.g. Ready, Running, Succeeded, Failed, Suspended."""
    status: Literal["True", "False", "Unknown"]
    """True, False or Unknown."""
    observed_generation: int | None = Field(default=None, ge=0)
    """metadata.generation the condition was computed from."""
    last_transition_time: str = Field(json_schema_extra={"format": "date-time"})
    """When the status last changed."""
    reason: str = Field(min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    """CamelCase reason, e.g. BackoffLimitExceeded."""
    message: str = Field(default="", max_length=32768)
    """Human-readable details."""


class JobStatusBase(ApiModel):
    """Status fields shared by both kinds."""

    phase: Phase | None = None
    """Pending, Running, Succeeded, Failed or Suspended."""
    conditions: list[Condition] | None = None
    """Kubernetes conditions (Ready, Running, Succeeded, Failed, Suspended, ...)."""
    observed_generation: int | None = None
    """metadata.generation this status describes."""
    job_name: str | None = None
    """Name of the batch/v1 Job running the work."""
    attempts: int | None = Field(default=None, ge=0)
    """Pods started so far (retries included)."""
    start_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    """When the work started."""
    completion_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    """When it finished."""
    message: str | None = None
    """Latest human-readable message (written by the operator)."""
    stage: str | None = Field(default=None, max_length=STAGE_MAX_LENGTH)
    """What the pod reports it is doing now (e.g. `loading model`, `training`); written by the pod, not the operator."""


class DataReport(ApiModel):
    """What the trainer found in the data, reported before training starts."""

    training_rows: int | None = Field(default=None, ge=0)
    """Training samples after the row checks."""
    eval_rows: int | None = Field(default=None, ge=0)
    """Held-out samples (before dataset.eval.maxSamples)."""
    eval_samples: int | None = Field(default=None, ge=0)
    """Samples each evaluation runs on (after dataset.eval.maxSamples)."""
    tokens: int | None = Field(default=None, ge=0)
    """Tokens in all training samples."""
    trainable_tokens: int | None = Field(default=None, ge=0)
    """Tokens that carry loss, after truncation."""
    samples_over_max_length: int | None = Field(default=None, ge=0)
    """Samples longer than training.maxLength."""
    truncated_samples: int | None = Field(default=None, ge=0)
    """Samples cut at training.maxLength (bfd and none packing; bfd_split and wrapped keep every token)."""
    truncated_tokens: int | None = Field(default=None, ge=0)
    """Tokens lost to that truncation."""
    desirable_samples: int | None = Field(default=None, ge=0)
    """method kto: training rows labelled desirable (the others are undesirable)."""
    prepared_uri: str | None = None
    """Where the tokenized data is stored, content-addressed: a retry, a resume or a later job with the
    same data and tokenizer reuses it instead of tokenizing again."""


class MemoryPlan(ApiModel):
    """Will it fit? The prepare stage's estimate of the trainer's peak GPU memory (docs/trainer.md)."""

    bits: int | None = None
    """The quantization the run loads the base with (quantization.bits auto resolved)."""
    estimated_mib: int | None = Field(default=None, ge=0, alias="estimatedMiB")
    """Estimated peak memory of each GPU, with the CUDA context and allocator slack (MiB)."""
    gpu_memory_mib: int | None = Field(default=None, ge=0, alias="gpuMemoryMiB")
    """Memory of each GPU the job gets (MiB), when known."""
    gpu_memory_source: str | None = Field(default=None, max_length=256)
    """Where that figure comes from (resources.gpuMemory, a node label, the GPU itself)."""
    fits: bool | None = None
    """Whether the estimate fits it (unset when the GPU memory is unknown)."""


class FineTuneJobStatus(JobStatusBase):
    """Observed state of a FineTuneJob."""

    model: str | None = None
    """Base model (spec.model name or uri), shown by kubectl get."""
    progress: Progress | None = None
    """Live progress of the trainer."""
    data: DataReport | None = None
    """What the trainer found in the data (rows, tokens, truncation)."""
    checkpoint_uri: str | None = None
    """Latest complete checkpoint."""
    adapter_uri: str | None = None
    """The trained adapter (PEFT format), once the run succeeded."""
    report_uri: str | None = None
    """Markdown report with metrics and the loss curve."""
    wandb_url: str | None = None
    """W&B run page (or offline run folder in storage)."""
    merge_job_name: str | None = None
    """MergeJob created by spec.merge."""
    prepare_job_name: str | None = None
    """Name of the CPU-only Job of the prepare stage (spec.prepare)."""
    memory: MemoryPlan | None = None
    """The estimated peak GPU memory, and the quantization chosen (quantization.bits auto)."""


class FineTuneJob(ApiModel):
    """A FineTuneJob resource."""

    model_config = ConfigDict(extra="ignore")

    api_version: Literal["kubetune.dev/v1alpha1"] = API_VERSION
    kind: Literal["FineTuneJob"] = "FineTuneJob"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None


# ----------------------------------------------------------------------------------------------
# MergeJob
# ----------------------------------------------------------------------------------------------


class MergeSource(ApiModel):
    """The adapter to merge and the base it was trained on."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "has(self.fineTuneJobRef) != has(self.adapterUri)",
                    "set exactly one of source.fineTuneJobRef and source.adapterUri",
                )
            ]
        }
    )

    fine_tune_job_ref: LocalObjectRef | None = Field(default=None, alias="fineTuneJobRef")
    """A FineTuneJob in the same namespace; its adapter is used once it succeeds."""
    adapter_uri: S3Uri | None = None
    """s3:// folder of a kubetune adapter (with its manifest.json)."""
    base_model: ModelSource | None = None
    """Base model; defaults to the FineTuneJob's (or the adapter manifest's) model."""

    @model_validator(mode="after")
    def _exactly_one(self) -> MergeSource:
        _one_of(self, "fine_tune_job_ref", "adapter_uri", "source")
        if self.base_model is not None and self.base_model.adapter_from is not None:
            raise ValueError("source.baseModel.adapterFrom is for FineTuneJobs: a MergeJob merges source's adapter")
        return self


class Verify(ApiModel):
    """Checks run on the merged model before it is published."""

    prompts: list[str] = Field(default_factory=list, max_length=32)
    """Prompts run through generate(); the outputs are recorded in status.samples."""
    max_new_tokens: int = Field(default=32, ge=1, le=4096)
    """Tokens generated per prompt."""
    tolerance: float | None = Field(default=None, gt=0)
    """Largest allowed logit difference merged vs base+adapter (default depends on dtype)."""


class MergeJobSpec(JobControls):
    """Merge a LoRA adapter into its base model and publish a standalone model."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("!has(self.resources.nodes) || self.resources.nodes == 1",
                    "a MergeJob runs in one pod: resources.nodes must be 1"),
            ]
        }
    )

    source: MergeSource
    """The adapter and its base."""
    dtype: Dtype = "bfloat16"
    """Dtype the base is loaded and the merged model saved in (never 4-bit)."""
    output: S3Output
    """Where the merged model goes."""
    storage: Storage | None = None
    """Object storage; defaults to the FineTuneJob's storage."""
    verify: Verify = Field(default_factory=Verify, json_schema_extra=EMPTY_DEFAULT)
    """Verification of the merged model."""
    resources: Resources = Field(
        default_factory=lambda: Resources(gpus=0), json_schema_extra={"default": {"gpus": 0}}
    )
    """Pod resources (CPU is fine for small models)."""

    @model_validator(mode="after")
    def _one_pod(self) -> MergeJobSpec:
        if self.resources.nodes != 1:
            raise ValueError("a MergeJob runs in one pod: resources.nodes must be 1")
        return self


class Verification(ApiModel):
    """Result of the merged-vs-adapter check."""

    max_logit_diff: float | None = None
    """Largest absolute logit difference merged vs base+adapter on the probe inputs."""
    tolerance: float | None = None
    """Tolerance it was checked against."""
    passed: bool | None = None
    """Whether the merged model matched within tolerance."""


class Sample(ApiModel):
    """A generation from the merged model."""

    prompt: str
    """The prompt."""
    output: str
    """What the merged model generated."""


class MergeJobStatus(JobStatusBase):
    """Observed state of a MergeJob."""

    merged_uri: str | None = None
    """The published merged model."""
    adapter_uri: str | None = None
    """The adapter that was merged."""
    verification: Verification | None = None
    """Result of the logit comparison."""
    samples: list[Sample] | None = None
    """Generations from the merged model for spec.verify.prompts."""


class MergeJob(ApiModel):
    """A MergeJob resource."""

    model_config = ConfigDict(extra="ignore")

    api_version: Literal["kubetune.dev/v1alpha1"] = API_VERSION
    kind: Literal["MergeJob"] = "MergeJob"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: MergeJobSpec
    status: MergeJobStatus | None = None


KINDS: dict[str, type[FineTuneJob] | type[MergeJob]] = {"FineTuneJob": FineTuneJob, "MergeJob": MergeJob}


def parse_manifest(doc: dict[str, Any]) -> FineTuneJob | MergeJob:
    """Validate a manifest dict (as read from YAML) into its model; raises pydantic.ValidationError."""
    kind = doc.get("kind")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    if doc.get("apiVersion") != API_VERSION:
        raise ValueError(f"apiVersion must be {API_VERSION}, got {doc.get('apiVersion')!r}")
    return KINDS[kind].model_validate(doc)
