"""A run's fingerprint: what determines its result, so an ``output.uri`` is only ever reused by the
same run (docs/trainer.md, "Bound to the spec").

The fingerprint hashes three things:

* the spec fields that change the trained adapter: ``model`` (name or uri, revision, the adapter it
  continues), ``quantization``, ``lora``, ``dataset`` (source, uri, split, eval split, format and
  its fields), ``training``, and for methods other than sft ``method`` and its settings (``dpo``,
  ``orpo``, ``kto``; an sft run's fingerprint is what it was before methods existed) — minus the fields that
  only change how a run is watched or stored (:data:`OPERATIONAL`). Names, ``suspend``,
  ``resources`` (GPUs and nodes too: a checkpoint resumes with any number of ranks),
  ``training.distributed``, ``storage``, ``tracking``, ``image``, ``pod``, retries and ``merge``
  never count. A new field counts unless it is listed there, so the rule errs on the side of
  "another run";
* the dataset's content: the ETag and size of every object under an ``s3://`` uri, or the sha256 of
  every local file (a hub id or ``hub://`` dataset counts by its name only);
* the model's content for ``model.uri`` (ETags); a hub ``model.name`` counts by name and revision
  (pin ``model.revision`` to make that exact); the content of ``model.adapterFrom.uri`` (ETags).

``manifest.json`` and every checkpoint pointer carry it with its inputs and the run's owner. A
complete run with the same fingerprint is reused; anything else at that output is refused with
:class:`OutputConflict`, naming the owner and the fields that differ, before any model or data moves.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from kubetune import api, contract
from kubetune_trainer.runtime import KubetuneError
from kubetune_trainer.storage import Store, is_s3, sha256_file, split_s3

# Spec fields (wire names) that do not change the result: cadence of logs, evaluations and
# checkpoints, retention, safety limits of the watchdog and data checks, evaluation-only settings.
OPERATIONAL = {
    "training": {"loggingSteps", "evalSteps", "saveSteps", "keepCheckpoints", "watchdog", "maxTruncatedFraction",
                 "distributed"},
    "dataset": {"secretRef"},
    "dataset.eval": {"maxSamples"},
    "model": {"secretRef", "trustRemoteCode"},
}


class OutputConflict(KubetuneError):
    """``output.uri`` holds another run's result or checkpoints: never overwritten, never reused."""

    exit_code = contract.EXIT_OUTPUT_CONFLICT
    reason = "OutputConflict"


def spec_inputs(spec: api.FineTuneJobSpec) -> dict[str, Any]:
    """The result-determining part of the spec, as wire (camelCase) JSON."""
    wire = spec.to_wire()
    out: dict[str, Any] = {}
    for section in ("model", "quantization", "lora", "dataset", "training"):
        value = dict(wire.get(section) or {})
        for key in OPERATIONAL.get(section, ()):
            value.pop(key, None)
        out[section] = value
    if spec.method != "sft":
        out["method"] = spec.method
        out[spec.method] = spec.method_settings().to_wire()  # type: ignore[union-attr]
    if "eval" in out["dataset"]:
        out["dataset"]["eval"] = {k: v for k, v in out["dataset"]["eval"].items()
                                  if k not in OPERATIONAL["dataset.eval"]}
    return out


def content_digest(uri: str, store: Store) -> str | None:
    """A digest of what is stored at ``uri`` (one object or a folder); None when nothing is there, or
    when the uri is not storage this pod can list (a hub id, ``hub://``)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        objects: dict[str, str] = {}
        try:
            pages = store.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
            for page in pages:
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(key):].lstrip("/")
                    if obj["Key"] == key or obj["Key"].startswith(f"{key}/") or not key:
                        objects[rel] = f"{obj.get('ETag', '').strip(chr(34))}:{obj.get('Size')}"
        except Exception as err:  # noqa: BLE001 - reported like every storage failure
            from kubetune_trainer.runtime import StorageError

            if getattr(err, "response", {}).get("Error", {}).get("Code") == "NoSuchBucket":
                return None  # nothing there: the recipe names the missing input when it reads it
            raise StorageError(f"cannot list {uri} to fingerprint it: {err}") from err
        return _digest(objects) if objects else None
    path = Path(uri.removeprefix("file://"))
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return _digest({p.relative_to(path).as_posix(): sha256_file(p) for p in files}) if files else None
    return None


def _digest(doc: Any) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def run_inputs(spec: api.FineTuneJobSpec, store: Store) -> dict[str, Any]:
    """Everything the fingerprint hashes: the spec part and the content digests."""
    inputs = spec_inputs(spec)
    inputs["datasetContent"] = content_digest(spec.dataset.uri, store)
    inputs["modelContent"] = content_digest(spec.model.uri, store) if spec.model.uri else None
    adapter = spec.model.adapter_from.uri if spec.model.adapter_from else None
    if adapter:  # only then: an unchained run's fingerprint is unchanged
        inputs["adapterContent"] = content_digest(adapter, store)
    return inputs


def of(inputs: dict[str, Any]) -> str:
    """The fingerprint of run inputs (sha256 hex)."""
    return _digest(inputs)


def owner(name: str | None, namespace: str | None, env: Any = os.environ) -> dict[str, str]:
    """Who wrote a manifest or checkpoint: the resource's namespace/name and uid (from the pod's env)."""
    found = {"namespace": namespace, "name": name, "uid": env.get(contract.ENV_UID)}
    return {k: v for k, v in found.items() if v}


def differences(theirs: dict[str, Any], ours: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths whose values differ, e.g. ``dataset.uri ('a' there, 'b' here)``; a content
    digest only when its uri is the same (else the uri says it)."""
    out = []
    for key in sorted(set(theirs) | set(ours)):
        a, b = theirs.get(key), ours.get(key)
        path = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{path}.")
        elif a != b and key in CONTENT:
            section, what = CONTENT[key]
            if _uri(theirs, section) == _uri(ours, section):
                out.append(f"the {what}'s content (the files at {section}.uri changed)")
        elif a != b:
            out.append(f"{path} ({_short(a)} there, {_short(b)} here)")
    return out


CONTENT = {"datasetContent": ("dataset", "dataset"), "modelContent": ("model", "model"),
           "adapterContent": ("model.adapterFrom", "continued adapter")}


def _uri(inputs: dict[str, Any], section: str) -> Any:
    node: Any = inputs
    for part in section.split("."):
        node = (node or {}).get(part) if isinstance(node, dict) else None
    return (node or {}).get("uri") if isinstance(node, dict) else None


def _short(value: Any) -> str:
    if value is None:
        return "unset"
    text = json.dumps(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _who(doc: dict[str, Any]) -> str:
    o = doc.get("owner") or {}
    name = o.get("name") or doc.get("name")
    who = f"FineTuneJob {o['namespace']}/{name}" if o.get("namespace") and name else \
        f"FineTuneJob {name}" if name else "an unnamed run (kubetune run)"
    if o.get("uid"):
        who += f" (uid {o['uid']})"
    return who


def check(found: dict[str, Any], what: str, where: str, fingerprint: str, inputs: dict[str, Any]) -> None:
    """Raise OutputConflict unless ``found`` (a manifest or checkpoint pointer) has our fingerprint."""
    theirs = found.get("fingerprint")
    if theirs == fingerprint:
        return
    fix = (f"kubetune never overwrites or reuses another run's results: set another output.uri, or delete "
           f"{where} first if that run may go")
    if theirs is None:
        raise OutputConflict(f"{where} already holds {what} written without a fingerprint (an earlier kubetune, "
                             f"by {_who(found)}); {fix}")
    diff = differences(found.get("fingerprintInputs") or {}, inputs)
    detail = f": it differs in {'; '.join(diff[:5])}" if diff else ""
    raise OutputConflict(f"{where} already holds {what} of {_who(found)} with another spec (fingerprint "
                         f"{str(theirs)[:12]}, this job's {fingerprint[:12]}){detail}. {fix}")
