"""MergeJob recipe: merge a LoRA adapter into its base model, verify it, publish a standalone model.

The classic ending of a QLoRA run, as the container a MergeJob launches::

    kubetune merge --spec merge.json        # what the pod runs (the operator mounts the spec)
    kubetune merge --spec - < mergejob.yaml # a whole manifest or a bare spec, JSON or YAML

    # merge.json (a resolved MergeJobSpec: the operator fills source.adapterUri from the FineTuneJob)
    {"source": {"adapterUri": "s3://models/run-1/adapter"},   # baseModel defaults to the adapter's
     "dtype": "bfloat16",                                     # never 4-bit: the merge is exact
     "output": {"uri": "s3://models/run-1/merged"},
     "storage": {"endpoint": "http://minio.storage:9000"},    # credentials: AWS_* env from the Secret
     "verify": {"prompts": ["What is a Kubernetes Job?"], "maxNewTokens": 32}}

Steps, top-down in :func:`merge` (this module is the recipe; the pieces live in
:mod:`~kubetune_trainer.modeling` (download, load), :mod:`~kubetune_trainer.merge_lora` (adapter,
merge) and :mod:`~kubetune_trainer.merge_verify` (probes, check, samples, model card)):

1. Resolve the source: the adapter's ``manifest.json`` (a run without one is incomplete) names the
   base model; ``source.baseModel``, when given, must be the same model.
2. Check the output is writable (before any heavy work). Already published for this very source?
   Return that result (a retried pod does no work).
3. Download the adapter (checksums verified against its manifest) and the base (``s3://``
   folder, or a hub id / local path).
4. Load the base in ``spec.dtype`` (low_cpu_mem_usage, on the GPU when there is one) and the adapter
   with ``PeftModel.from_pretrained``: plain LoRA, rsLoRA, DoRA, adapters that resized the
   vocabulary, target a tied embedding, or carry ``modules_to_save`` (e.g. ``lm_head``).
5. Probe logits of base+adapter, unmerged, on a few fixed inputs (one padded batch, one forward
   pass), BEFORE merging in place (one copy only), in float32 arithmetic over the dtype's weights,
   so bf16 noise cannot hide a broken merge.
6. Merge in place: PEFT's ``merge_and_unload(safe_merge=True)``.
7. ``save_pretrained`` as sharded safetensors with the tokenizer and generation config; free the
   model; reload the saved folder and check its logits against the probe: what is published is
   what was verified. ``spec.verify.prompts`` run through ``generate()`` (greedy, chat template)
   on that reload.
8. Upload (parallel, multipart, retried), then write ``manifest.json`` LAST (checksums, source,
   base, dtype, verification, samples, timings, peak RSS).

Returns the status result: ``mergedUri``, ``adapterUri``, ``verification``, ``samples``.

Raises (exit codes in :mod:`kubetune.contract`):
    InvalidSpec: ``source.adapterUri`` unresolved, or the base model cannot be loaded.
    InvalidAdapter: no adapter manifest, checksum mismatch, adapter does not fit the base model.
    StorageError: output not writable, download or upload failed.
    VerificationFailed: merged logits differ from base+adapter beyond the tolerance (nothing published).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import resource
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kubetune import api, contract
from kubetune_trainer import merge_lora, modeling, storage
from kubetune_trainer.merge_verify import (
    check,
    describe,
    generate_samples,
    logits,
    max_diff,
    probe_inputs,
    tolerance,
    write_model_card,
)
from kubetune_trainer.runtime import InvalidAdapter, InvalidSpec, PodContext, fit_result

log = logging.getLogger("kubetune.merge")

# Shards of at most 2 GB: an 8B model in bf16 is 8 shards, uploaded and downloaded in parallel,
# and no single object needs a huge multipart upload. (transformers' default is one 50 GB file.)
MAX_SHARD_SIZE = "2GB"
TERMINATION_BUDGET = contract.TERMINATION_MESSAGE_LIMIT - 400  # room for reason and message
MERGE_METHOD = "peft"  # recorded in the manifest: merge_and_unload(safe_merge=True)


def merge(spec: api.MergeJobSpec, ctx: PodContext, max_shard_size: str | int = MAX_SHARD_SIZE) -> dict[str, Any]:
    """Merge ``spec.source`` into a standalone model at ``spec.output.uri``; returns the status result."""
    started = time.monotonic()
    timings: dict[str, float] = {}
    store = storage.Store.from_spec(spec.storage)
    adapter_uri = _require_adapter_uri(spec.source)
    output_uri = spec.output.uri.rstrip("/")

    # 1. Resolve the source from the adapter's manifest.
    adapter_manifest = storage.read_manifest(store, adapter_uri)
    if adapter_manifest is None:
        raise InvalidAdapter(
            f"{storage.join(adapter_uri, contract.MANIFEST)} is missing: the adapter is incomplete (its training run "
            "did not finish) or adapterUri does not point at a kubetune adapter folder"
        )
    base = resolve_base(spec.source.base_model, adapter_manifest, adapter_uri)
    source = source_fingerprint(spec, adapter_uri, base, adapter_manifest)

    # 2. Fail fast on the output. Idempotent: the same merge already published -> return its result.
    store.check_writable(output_uri)
    existing = storage.read_manifest(store, output_uri)
    if existing is not None and existing.get("source") == source:
        log.info("%s already holds this merge (created %s): nothing to do", output_uri, existing.get("createdAt"))
        return result_from_manifest(existing)

    # 3. Fetch adapter and base.
    ctx.reporter.patch({"stage": f"downloading adapter {adapter_uri} and base model {base.display()}"})
    work = ctx.work_dir / "merge"
    with _timed(timings, "download"):
        adapter_dir = fetch_adapter(store, adapter_uri, adapter_manifest, work / "adapter")
        base_path = modeling.resolve_model(base, store, work)

    # 4. Load base (in dtype, never 4-bit) + adapter.
    ctx.reporter.patch({"stage": f"loading {base.display()} in {spec.dtype}"})
    with _timed(timings, "load"):
        tokenizer = load_tokenizer(adapter_dir, base_path, base)
        weights = merge_lora.AdapterFile.read(adapter_dir)
        model = merge_lora.load_adapter(modeling.load_unquantized(base_path, base, spec.dtype), adapter_dir, base,
                                        weights)
    if weights is not None:
        weights.warn_if_untrained()
    probes = probe_inputs(tokenizer, spec.verify.prompts)

    # 5. Reference logits of base+adapter, unmerged.
    with _timed(timings, "verify"):
        reference = logits(model, probes)
    scale, tol = tolerance(reference, spec.dtype, spec.verify.tolerance)

    # 6. Merge in place.
    ctx.reporter.patch({"stage": "merging the adapter into the base"})
    with _timed(timings, "merge"):
        model = merge_lora.merge(model)

    # 7. Save, free, reload what was saved, check it again, and sample from it.
    ctx.reporter.patch({"stage": "saving and verifying the merged model"})
    merged_dir = work / "merged"
    shutil.rmtree(merged_dir, ignore_errors=True)
    with _timed(timings, "save"):
        save_merged(model, tokenizer, merged_dir, max_shard_size)
    del model
    gc.collect()
    with _timed(timings, "verify"):
        reloaded = modeling.load_unquantized(str(merged_dir), base, spec.dtype)
        published_diff = max_diff(reference, logits(reloaded, probes))
        check(published_diff, tol, "the saved merged model (reloaded)")
        samples = generate_samples(reloaded, tokenizer, spec.verify.prompts, spec.verify.max_new_tokens)
    del reloaded, reference
    gc.collect()
    verification = {"maxLogitDiff": published_diff, "tolerance": tol, "passed": True}
    write_model_card(merged_dir, base, adapter_uri, spec.dtype, verification, adapter_manifest)

    # 8. Publish: files first, manifest last.
    ctx.reporter.patch({"stage": f"uploading the merged model to {output_uri}"})
    if existing is not None:  # a merge of another source lives there: unpublish it, then overwrite its files
        log.warning("%s holds a merge of another source (%s): replacing it", output_uri, existing.get("source"))
        store.delete(storage.join(output_uri, contract.MANIFEST))
    with _timed(timings, "upload"):
        files = store.upload_dir(merged_dir, output_uri)
    timings["total"] = time.monotonic() - started
    manifest = storage.write_manifest(
        store, output_uri, files,
        kind="MergedModel",
        source=source,
        mergedUri=output_uri,
        adapterUri=adapter_uri,
        baseModel=base.to_wire(),
        dtype=spec.dtype,
        verification=verification,
        verificationDetails={"logitScale": scale, "probes": len(probes.ids), "probeTokens": probes.tokens},
        mergeMethod=MERGE_METHOD,
        samples=samples,
        timings={k: round(v, 3) for k, v in timings.items()},
        peakRssMiB=peak_rss_mib(),
    )
    log.info("published %s (max logit diff %.3g <= %.3g) in %.1fs", output_uri, published_diff, tol,
             timings["total"])
    shutil.rmtree(work, ignore_errors=True)
    return result_from_manifest(manifest)


# ----------------------------------------------------------------------------------------------
# 1-2. Source resolution (pure)
# ----------------------------------------------------------------------------------------------


def _require_adapter_uri(source: api.MergeSource) -> str:
    if not source.adapter_uri:
        raise InvalidSpec(
            f"source.fineTuneJobRef {source.fine_tune_job_ref.name if source.fine_tune_job_ref else ''!r} was not "
            "resolved: the operator passes the FineTuneJob's status.adapterUri as source.adapterUri"
        )
    return source.adapter_uri.rstrip("/")


def same_model(a: api.ModelSource, b: api.ModelSource) -> bool:
    """Same hub id or the same s3:// folder (and revision, when both name one)."""
    if (a.name or "") != (b.name or ""):
        return False
    if (a.uri or "").rstrip("/") != (b.uri or "").rstrip("/"):
        return False
    return a.revision is None or b.revision is None or a.revision == b.revision


def resolve_base(given: api.ModelSource | None, adapter_manifest: dict[str, Any], adapter_uri: str) -> api.ModelSource:
    """The base model to merge into: the manifest's ``spec.model``; ``given`` must match it."""
    trained = (adapter_manifest.get("spec") or {}).get("model")
    if trained is None:
        if given is None:
            raise InvalidAdapter(
                f"the manifest of {adapter_uri} names no base model (spec.model): set source.baseModel"
            )
        log.warning("the manifest of %s names no base model: trusting source.baseModel %s", adapter_uri,
                    given.display())
        return given
    try:
        trained_on = api.ModelSource.model_validate(trained).model_copy(update={"adapter_from": None})  # continued:
    except ValidationError as err:  # the adapter holds the one it continued (model.adapterFrom), merged as one
        raise InvalidAdapter(f"the manifest of {adapter_uri} has an invalid spec.model: {err}") from err
    if given is not None and not same_model(given, trained_on):
        raise InvalidAdapter(
            f"the adapter {adapter_uri} was trained on {describe(trained_on)}, not on source.baseModel "
            f"{describe(given)}: merging into another base gives a broken model"
        )
    if given is None:
        return trained_on
    # Same model: keep the user's access settings (token, trust) with the trained revision if any.
    return given.model_copy(update={"revision": given.revision or trained_on.revision})


def source_fingerprint(spec: api.MergeJobSpec, adapter_uri: str, base: api.ModelSource,
                       adapter_manifest: dict[str, Any]) -> dict[str, Any]:
    """What makes a merge the same merge: adapter (uri and content), base, dtype, verify settings."""
    files = json.dumps(adapter_manifest.get("files", {}), sort_keys=True).encode()
    return {
        "adapterUri": adapter_uri,
        "adapterFilesSha256": hashlib.sha256(files).hexdigest(),
        "baseModel": {k: v for k, v in base.to_wire().items() if k in ("name", "uri", "revision")},
        "dtype": spec.dtype,
        "verify": spec.verify.to_wire(),
    }


def result_from_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """The status result (camelCase), sized for the 4096-byte termination message."""
    result = {
        "mergedUri": manifest["mergedUri"],
        "adapterUri": manifest["adapterUri"],
        "verification": manifest["verification"],
        "samples": manifest.get("samples", []),
    }
    return fit_result(result, TERMINATION_BUDGET)


# ----------------------------------------------------------------------------------------------
# 3-4, 7. Fetching, loading, saving
# ----------------------------------------------------------------------------------------------


def fetch_adapter(store: storage.Store, uri: str, manifest: dict[str, Any], dest: Path) -> Path:
    """Download the adapter folder and check every file against the manifest's sha256."""
    shutil.rmtree(dest, ignore_errors=True)
    store.download_dir(uri, dest)
    bad = storage.verify_files(dest, manifest)
    if bad:
        raise InvalidAdapter(f"adapter files differ from the checksums in {uri}/{contract.MANIFEST}: "
                             f"{', '.join(sorted(bad)[:5])} (corrupted or modified after training)")
    if not (dest / "adapter_config.json").is_file():
        raise InvalidAdapter(f"{uri} holds no adapter_config.json: not a PEFT adapter folder")
    return dest


def load_tokenizer(adapter_dir: Path, base_path: str, base: api.ModelSource) -> Any:
    """The adapter's tokenizer when the run saved one (it may add a chat template or tokens), else the
    base's, published as it is (no pad token added)."""
    from transformers import AutoTokenizer

    if (adapter_dir / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(adapter_dir)
    try:
        return modeling.load_tokenizer(base_path, base, pad=False)
    except (OSError, ValueError) as err:
        raise InvalidSpec(f"cannot load the tokenizer of {base.display()}: {err}") from err


def save_merged(model: Any, tokenizer: Any, out: Path, max_shard_size: str | int) -> None:
    """Sharded safetensors + config + generation config + tokenizer; never adapter files."""
    model.save_pretrained(out, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    for stray in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        (out / stray).unlink(missing_ok=True)


@contextlib.contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    start = time.monotonic()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.monotonic() - start


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
