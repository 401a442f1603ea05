"""The contract between the operator and the containers it launches (trainer and merge).

The operator builds pods that set these environment variables and mount the resolved spec; the
containers read them. Both sides import this module, so a name changes in one place only.
"""

from __future__ import annotations

# Where the resolved spec (JSON, camelCase, secrets only by reference) is mounted from a ConfigMap.
SPEC_DIR = "/etc/kubetune"
SPEC_KEY = "spec.json"
SPEC_FILE = f"{SPEC_DIR}/{SPEC_KEY}"

# Environment the pod gets.
ENV_SPEC_FILE = "KUBETUNE_SPEC_FILE"  # path of the spec file (default SPEC_FILE)
ENV_KIND = "KUBETUNE_KIND"  # FineTuneJob | MergeJob
ENV_NAME = "KUBETUNE_NAME"  # name of the FineTuneJob/MergeJob this pod works for
ENV_NAMESPACE = "KUBETUNE_NAMESPACE"
ENV_UID = "KUBETUNE_UID"  # uid of the owning resource (guards against a re-created namesake)
ENV_TERMINATION_LOG = "KUBETUNE_TERMINATION_LOG"  # default /dev/termination-log
# Progress channel: the pod's own ServiceAccount token, allowed to patch only its own resource's
# status (Role with resourceNames). The API server comes from KUBERNETES_SERVICE_HOST/PORT.
ENV_SA_DIR = "KUBETUNE_SERVICEACCOUNT_DIR"  # default /var/run/secrets/kubernetes.io/serviceaccount
ENV_API_SERVER = "KUBETUNE_API_SERVER"  # optional override of https://$KUBERNETES_SERVICE_HOST:PORT
ENV_WORK_DIR = "KUBETUNE_WORK_DIR"  # scratch space (emptyDir): model download, checkpoints
# Distributed training (resources.gpus x resources.nodes > 1): `kubetune train` runs torchrun,
# which starts KUBETUNE_NPROC_PER_NODE ranks in the pod. With KUBETUNE_NNODES > 1 the pods of an
# Indexed Job meet at pod 0 (torchrun's c10d rendezvous at KUBETUNE_RDZV_ENDPOINT, pod 0's name
# under the job's headless Service); KUBETUNE_NODE_RANK is the pod's completion index.
ENV_NPROC_PER_NODE = "KUBETUNE_NPROC_PER_NODE"
ENV_NNODES = "KUBETUNE_NNODES"
ENV_NODE_RANK = "KUBETUNE_NODE_RANK"
ENV_RDZV_ENDPOINT = "KUBETUNE_RDZV_ENDPOINT"
ENV_RDZV_ID = "KUBETUNE_RDZV_ID"
RDZV_PORT = 29400
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
DEFAULT_SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
WORK_DIR = "/var/kubetune/work"
CACHE_DIR = "/var/kubetune/cache"  # HF_HOME
# spec.modelCache: a PersistentVolumeClaim mounted here, shared by retries, later jobs and MergeJobs.
# s3:// models are kept under models/<content digest>/; hub models in HF's own cache (hub/).
MODEL_CACHE_DIR = "/var/kubetune/model-cache"
ENV_MODEL_CACHE = "KUBETUNE_MODEL_CACHE"
# GPU memory of the nodes a FineTuneJob may run on, read by the operator from their GPU
# feature-discovery label (MiB), for the trainer's "will it fit?" check (kubetune_trainer.memory).
ENV_GPU_MEMORY_MIB = "KUBETUNE_GPU_MEMORY_MIB"
ENV_GPU_MEMORY_SOURCE = "KUBETUNE_GPU_MEMORY_SOURCE"
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"

# Credentials, injected with secretKeyRef from the Secrets named in the spec.
ENV_AWS_ACCESS_KEY_ID = "AWS_ACCESS_KEY_ID"
ENV_AWS_SECRET_ACCESS_KEY = "AWS_SECRET_ACCESS_KEY"
ENV_WANDB_API_KEY = "WANDB_API_KEY"
ENV_HF_TOKEN = "HF_TOKEN"
ENV_DATASET_TOKEN = "KUBETUNE_DATASET_TOKEN"

# Exit codes: the operator maps them to condition reasons. Anything else is a crash.
EXIT_OK = 0
EXIT_CRASH = 1
EXIT_INVALID_SPEC = 2
EXIT_INVALID_DATASET = 3
EXIT_STORAGE = 4
EXIT_INVALID_ADAPTER = 5
EXIT_VERIFICATION_FAILED = 6
EXIT_PREEMPTED = 7  # stopped on SIGTERM after saving a checkpoint; a retry resumes
EXIT_OUTPUT_CONFLICT = 8  # output.uri holds another run's result or checkpoints (another fingerprint)
EXIT_DIVERGED = 9  # the loss became NaN/Inf or exploded: the watchdog stopped the run
EXIT_STALLED = 10  # no training step for training.watchdog.stallSeconds: the watchdog stopped the run
EXIT_INSUFFICIENT_GPU_MEMORY = 11  # the estimated peak memory exceeds the GPUs' (prepare stage, no GPU pod)

EXIT_REASONS = {
    EXIT_INVALID_SPEC: "InvalidSpec",
    EXIT_INVALID_DATASET: "InvalidDataset",
    EXIT_STORAGE: "StorageError",
    EXIT_INVALID_ADAPTER: "InvalidAdapter",
    EXIT_VERIFICATION_FAILED: "VerificationFailed",
    EXIT_PREEMPTED: "Preempted",
    EXIT_OUTPUT_CONFLICT: "OutputConflict",
    EXIT_DIVERGED: "Diverged",
    EXIT_STALLED: "Stalled",
    EXIT_INSUFFICIENT_GPU_MEMORY: "InsufficientGPUMemory",
}
# Failures that a retry cannot fix: the operator fails the job at once instead of retrying.
PERMANENT_EXIT_CODES = (EXIT_INVALID_SPEC, EXIT_INVALID_DATASET, EXIT_INVALID_ADAPTER,
                        EXIT_VERIFICATION_FAILED, EXIT_OUTPUT_CONFLICT, EXIT_DIVERGED, EXIT_STALLED,
                        EXIT_INSUFFICIENT_GPU_MEMORY)

# The termination message (at most 4096 bytes, JSON): {"reason": str, "message": str, "result": {...}}
# result for FineTuneJob: adapterUri, checkpointUri, reportUri, wandbUrl, progress{...}
# result for MergeJob: mergedUri, adapterUri, verification{...}, samples[...]
TERMINATION_MESSAGE_LIMIT = 4096

# Layout under output.uri
ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
LATEST_POINTER = "checkpoints/latest.json"
MANIFEST = "manifest.json"  # written last: its presence means complete
REPORT = "report.md"

# Labels and annotations
LABEL_JOB_NAME = "kubetune.dev/job-name"
LABEL_KIND = "kubetune.dev/kind"
LABEL_STAGE = "kubetune.dev/stage"  # "prepare" on the CPU Job of the prepare stage and its pod
STAGE_PREPARE = "prepare"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
LABEL_PRIORITY_CLASS = "kueue.x-k8s.io/priority-class"
