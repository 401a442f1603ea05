"""Checks the CRD schema cannot express, as pure functions over already-fetched objects.

* the spec parses with the API models (the same rules the trainer applies: a bad spec fails here,
  before a GPU pod is started);
* every referenced Secret exists and has the referenced keys (values are never read or logged);
* GPU settings make sense (an extended resource needs a domain prefix);
* a MergeJob's FineTuneJob exists and has succeeded.

Each check returns a :class:`~kubetune_operator.status.Verdict` describing why the Job is not
created (``phase`` Failed/Pending, a CamelCase ``reason``, a clear ``message``), or None when fine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from kubetune import api
from kubetune_operator.status import Verdict, truncate

SPEC_MODELS: dict[str, type[api.FineTuneJobSpec] | type[api.MergeJobSpec]] = {
    "FineTuneJob": api.FineTuneJobSpec,
    "MergeJob": api.MergeJobSpec,
}


@dataclass(frozen=True)
class SecretNeed:
    """A Secret the pod needs, with the keys it reads and the spec field that names it."""

    field: str
    name: str
    keys: tuple[str, ...]


def parse_spec(kind: str, raw: Mapping[str, Any]) -> tuple[api.FineTuneJobSpec | api.MergeJobSpec | None,
                                                          Verdict | None]:
    """Validate ``spec`` with the API model: (spec, None) or (None, InvalidSpec verdict)."""
    try:
        return SPEC_MODELS[kind].model_validate(dict(raw)), None
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg']}" for e in err.errors())
        return None, Verdict("Failed", "InvalidSpec", truncate(f"invalid spec: {problems}"), stalled=True)


def secret_needs(spec: api.FineTuneJobSpec | api.MergeJobSpec) -> list[SecretNeed]:
    """Every Secret (and key) the pod will read through secretKeyRef."""
    needs: list[SecretNeed] = []
    if spec.storage is not None and spec.storage.secret_ref is not None:
        ref = spec.storage.secret_ref
        needs.append(SecretNeed("spec.storage.secretRef", ref.name,
                                (ref.access_key_id_key, ref.secret_access_key_key)))
    if isinstance(spec, api.FineTuneJobSpec):
        if spec.model.secret_ref is not None:
            needs.append(SecretNeed("spec.model.secretRef", spec.model.secret_ref.name, (spec.model.secret_ref.key,)))
        if spec.dataset.secret_ref is not None:
            needs.append(SecretNeed("spec.dataset.secretRef", spec.dataset.secret_ref.name,
                                    (spec.dataset.secret_ref.key,)))
        wandb = spec.tracking.wandb if spec.tracking else None
        if wandb is not None and wandb.secret_ref is not None:
            needs.append(SecretNeed("spec.tracking.wandb.secretRef", wandb.secret_ref.name, (wandb.secret_ref.key,)))
    elif spec.source.base_model is not None and spec.source.base_model.secret_ref is not None:
        ref2 = spec.source.base_model.secret_ref
        needs.append(SecretNeed("spec.source.baseModel.secretRef", ref2.name, (ref2.key,)))
    return needs


def check_secrets(needs: list[SecretNeed], secrets: Mapping[str, dict[str, Any] | None]) -> Verdict | None:
    """``secrets``: name -> the Secret as read (None when it does not exist)."""
    problems = []
    for need in needs:
        secret = secrets.get(need.name)
        if secret is None:
            problems.append(f"Secret {need.name!r} ({need.field}) not found")
            continue
        present = set(secret.get("data") or {}) | set(secret.get("stringData") or {})
        missing = [k for k in need.keys if k not in present]
        if missing:
            problems.append(f"Secret {need.name!r} ({need.field}) has no key {', '.join(map(repr, missing))}")
    if not problems:
        return None
    return Verdict("Pending", "SecretNotFound",
                   "; ".join(problems) + " in the job's namespace; create it and the job starts (re-checked "
                   "with backoff)", stalled=True)


def check_service_account(name: str, exists: bool) -> Verdict | None:
    """spec.pod.serviceAccountName (or the operator's default) must exist before a pod is made:
    the Job controller would otherwise retry the pod creation silently."""
    if exists:
        return None
    return Verdict("Pending", "ServiceAccountNotFound",
                   f"ServiceAccount {name!r} (spec.pod.serviceAccountName) not found in the job's namespace; "
                   "create it and the job starts (re-checked with backoff)", stalled=True)


def check_resources(spec: api.FineTuneJobSpec | api.MergeJobSpec, default_image: str | None) -> Verdict | None:
    """GPU resource name and image sanity."""
    problems = []
    res = spec.resources
    if res.gpus > 0 and ("/" not in res.gpu_resource or res.gpu_resource.split("/")[0].endswith("kubernetes.io")):
        problems.append(f"spec.resources.gpuResource {res.gpu_resource!r} is not an extended resource "
                        f"(expected e.g. nvidia.com/gpu) while spec.resources.gpus={res.gpus}")
    if not spec.image and not default_image:
        problems.append("spec.image is empty and the operator has no default trainer image (--trainer-image)")
    if not problems:
        return None
    return Verdict("Failed", "InvalidSpec", "; ".join(problems), stalled=True)


def check_fine_tune_job(ref: str, ftj: dict[str, Any] | None,
                        field: str = "spec.source.fineTuneJobRef") -> Verdict | None:
    """A MergeJob's source (or a FineTuneJob's model.adapterFrom): None when the FineTuneJob
    succeeded and has an adapter."""
    if ftj is None:
        return Verdict("Pending", "FineTuneJobNotFound",
                       f"FineTuneJob {ref!r} ({field}) does not exist in this namespace; "
                       "re-checked with backoff", stalled=True)
    status = ftj.get("status") or {}
    phase = status.get("phase")
    if phase == "Failed":
        return Verdict("Failed", "FineTuneJobFailed",
                       truncate(f"FineTuneJob {ref!r} failed: {status.get('message') or 'no message'}"), stalled=True)
    if phase == "Succeeded":
        if not status.get("adapterUri"):
            return Verdict("Failed", "AdapterNotFound",
                           f"FineTuneJob {ref!r} succeeded but has no status.adapterUri", stalled=True)
        return None
    return Verdict("Pending", "WaitingForFineTuneJob",
                   f"waiting for FineTuneJob {ref!r} to succeed (phase {phase or 'unknown'})")
