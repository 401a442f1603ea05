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

Steps, top-down in :func:`merge`:

1. Resolve the source: the adapter's ``manifest.json`` (a run without one is incomplete) names the
   base model; ``source.baseModel``, when given, must be the same model.
2. Check the output is writable (before any heavy work). Already published for this very source?
   Return that result (a retried pod does no work).
3. Download the adapter (checksums verified against its manifest) and the base (``s3://``
   folder, or a hub id / local path).
4. Load the base in ``spec.dtype`` (low_cpu_mem_usage, on the GPU when there is one). A plain LoRA
   on linear layers (the trainer's adapters) is read as its factors (:class:`DirectLora`: no PEFT
   import, no wrapped layers); any other adapter goes through ``PeftModel.from_pretrained``, which
   handles adapters that resized the vocabulary, target a tied embedding, or carry
   ``modules_to_save`` (e.g. ``lm_head``).
5. Probe logits of base+adapter, unmerged, on a few fixed inputs (one padded batch, one forward
   pass), BEFORE merging in place (one copy only), in float32 arithmetic over the dtype's weights,
   so bf16 noise cannot hide a broken merge.
6. Merge in place: ``W += scale * B @ A`` (what ``merge_and_unload`` computes, bit for bit), or
   PEFT's ``merge_and_unload(safe_merge=True)``.
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

import collections
import contextlib
import copy
import gc
import hashlib
import json
import logging
import math
import os
import re
import resource
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from pydantic import ValidationError

from kubetune import api, contract
from kubetune_trainer import storage
from kubetune_trainer.runtime import InvalidAdapter, InvalidSpec, PodContext, VerificationFailed

if TYPE_CHECKING:
    import torch

log = logging.getLogger("kubetune.merge")

# Shards of at most 2 GB: an 8B model in bf16 is 8 shards, uploaded and downloaded in parallel,
# and no single object needs a huge multipart upload. (transformers' default is one 50 GB file.)
MAX_SHARD_SIZE = "2GB"

# Default tolerance = REL_TOLERANCE[dtype] x the logit scale (largest |logit| on the probes, >= 1).
# Both sides are computed in float32 (see float32_compute) from the weights in the dtype, so what
# differs is the merged weight W + s*B@A rounded to the dtype (the reference keeps the LoRA in
# float32). Measured on SmolLM2-135M (30 layers, logit scale 44) with all-linear r=16 adapters that
# move the logits by up to 3.0 and 0.53: max diff float32 1.2e-4 (2.8e-6 of the scale), float16
# 0.047-0.057 (1.3e-3), bfloat16 0.26-0.41 (9.4e-3: bf16 keeps 8 significant bits). The defaults
# leave a 2.5-35x margin over those and stay well below the 3.0 effect of a trained-size adapter.
REL_TOLERANCE = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 2.5e-2}

# Fixed probe inputs: prose, code, and (when given) the verify prompts in the chat template.
PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog, and then the dog wakes up.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Kubernetes schedules pods onto nodes; a Job runs its pods until they complete.",
)
PROBE_MAX_TOKENS = 64
PROBE_PROMPTS = 3  # verify prompts also used as logit probes
TERMINATION_BUDGET = contract.TERMINATION_MESSAGE_LIMIT - 400  # room for reason and message


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
        base_path = fetch_base(store, base, work / "base")

    # 4. Load base (in dtype, never 4-bit) + adapter: a plain LoRA as its factors, anything else through PEFT.
    ctx.reporter.patch({"stage": f"loading {base.display()} in {spec.dtype}"})
    with _timed(timings, "load"):
        tokenizer = load_tokenizer(adapter_dir, base_path, base)
        model = load_base(base_path, base, spec.dtype)
        lora = DirectLora.read(adapter_dir, model)
        if lora is None:
            model = load_adapter(model, adapter_dir, base)
    probes = probe_inputs(tokenizer, spec.verify.prompts)
    warn_if_untrained(adapter_dir)

    # 5. Reference logits of base+adapter, unmerged.
    unmerged = lora.applied(model) if lora else contextlib.nullcontext()
    with _timed(timings, "verify"), unmerged:
        reference = logits(model, probes)
    scale = max(1.0, float(reference.abs().max()))
    tolerance = spec.verify.tolerance or REL_TOLERANCE[spec.dtype] * scale

    # 6. Merge in place.
    ctx.reporter.patch({"stage": "merging the adapter into the base"})
    with _timed(timings, "merge"):
        model = lora.merge_into(model) if lora else merge_peft(model)

    # 7. Save, free, reload what was saved, check it again, and sample from it.
    ctx.reporter.patch({"stage": "saving and verifying the merged model"})
    merged_dir = work / "merged"
    shutil.rmtree(merged_dir, ignore_errors=True)
    with _timed(timings, "save"):
        save_merged(model, tokenizer, merged_dir, max_shard_size)
    del model
    gc.collect()
    with _timed(timings, "verify"):
        reloaded = load_base(str(merged_dir), base, spec.dtype)
        published_diff = max_diff(reference, logits(reloaded, probes))
        check(published_diff, tolerance, "the saved merged model (reloaded)")
        samples = generate_samples(reloaded, tokenizer, spec.verify.prompts, spec.verify.max_new_tokens)
    del reloaded, reference
    gc.collect()
    verification = {"maxLogitDiff": published_diff, "tolerance": tolerance, "passed": True}
    write_model_card(merged_dir, base, adapter_uri, spec.dtype, verification)

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
        mergeMethod="direct" if lora else "peft",
        samples=samples,
        timings={k: round(v, 3) for k, v in timings.items()},
        peakRssMiB=peak_rss_mib(),
    )
    log.info("published %s (max logit diff %.3g <= %.3g) in %.1fs", output_uri, published_diff, tolerance,
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
        trained_on = api.ModelSource.model_validate(trained)
    except ValidationError as err:
        raise InvalidAdapter(f"the manifest of {adapter_uri} has an invalid spec.model: {err}") from err
    if given is not None and not same_model(given, trained_on):
        raise InvalidAdapter(
            f"the adapter {adapter_uri} was trained on {_describe(trained_on)}, not on source.baseModel "
            f"{_describe(given)}: merging into another base gives a broken model"
        )
    if given is None:
        return trained_on
    # Same model: keep the user's access settings (token, trust) with the trained revision if any.
    return given.model_copy(update={"revision": given.revision or trained_on.revision})


def _describe(model: api.ModelSource) -> str:
    return model.display() + (f"@{model.revision}" if model.revision else "")


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


def fit_result(result: dict[str, Any], budget: int) -> dict[str, Any]:
    """Shorten sample outputs (then prompts) evenly until the JSON fits ``budget`` bytes."""
    def size(r: dict[str, Any]) -> int:
        return len(json.dumps(r, separators=(",", ":")).encode())

    samples = result.get("samples") or []
    if size(result) <= budget or not samples:
        return result
    for keep_prompt, keep_output in ((400, 2000), (200, 600), (120, 300), (80, 160), (60, 60), (40, 0)):
        short = [{"prompt": _cut(s["prompt"], keep_prompt), "output": _cut(s["output"], keep_output)}
                 for s in samples]
        if size({**result, "samples": short}) <= budget:
            return {**result, "samples": short}
    return {**result, "samples": short[: max(1, len(short) // 4)]}


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: max(0, n - 1)] + "…"


# ----------------------------------------------------------------------------------------------
# 3. Fetching
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


def fetch_base(store: storage.Store, base: api.ModelSource, dest: Path) -> str:
    """A path or hub id ``from_pretrained`` can load: s3:// folders are downloaded first."""
    if base.uri:
        shutil.rmtree(dest, ignore_errors=True)
        store.download_dir(base.uri, dest)
        return str(dest)
    assert base.name is not None
    return base.name


# ----------------------------------------------------------------------------------------------
# 4. Loading
# ----------------------------------------------------------------------------------------------


def _hub_kwargs(base: api.ModelSource) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": base.trust_remote_code}
    if base.name and base.revision:
        kwargs["revision"] = base.revision
    if os.environ.get(contract.ENV_HF_TOKEN):
        kwargs["token"] = os.environ[contract.ENV_HF_TOKEN]
    return kwargs


def load_tokenizer(adapter_dir: Path, base_path: str, base: api.ModelSource) -> Any:
    """The adapter's tokenizer when the run saved one (it may add a chat template or tokens), else the base's."""
    from transformers import AutoTokenizer

    if (adapter_dir / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(adapter_dir)
    try:
        return AutoTokenizer.from_pretrained(base_path, **_hub_kwargs(base))
    except (OSError, ValueError) as err:
        raise InvalidSpec(f"cannot load the tokenizer of {base.display()}: {err}") from err


def load_base(path: str, base: api.ModelSource, dtype: str) -> Any:
    """Load a causal LM in ``dtype`` (never quantized), on the GPU(s) when there are any."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, **_hub_kwargs(base))
    except (OSError, ValueError) as err:
        raise InvalidSpec(f"cannot load the base model {base.display()}: {err}") from err
    if getattr(config, "quantization_config", None):
        raise InvalidSpec(f"the base model {base.display()} is saved quantized; merge into the full-precision model")
    device_map = "auto" if torch.cuda.is_available() else None
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, dtype), low_cpu_mem_usage=True, device_map=device_map, **_hub_kwargs(base)
        ).eval()
    except (OSError, ValueError) as err:
        raise InvalidSpec(f"cannot load the base model {base.display()}: {err}") from err


# adapter_config.json fields DirectLora handles: r, lora_alpha and use_rslora are applied; the others
# cannot change the merge of a plain LoRA: they pick the modules (which the saved weights name
# anyway), matter only while training, or are read only together with a feature that must be off
# (megatron_config, use_qalora); fan_in_fan_out follows the layer type, as in PEFT. Every other field
# must be off (null, false, empty, "none"), else PEFT merges the adapter.
LORA_HANDLED_FIELDS = frozenset({
    "r", "lora_alpha", "use_rslora", "init_lora_weights",
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "peft_version", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
    "lora_dropout", "fan_in_fan_out", "megatron_core", "qalora_group_size",
})
LORA_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])\.weight")


class _NeedsPeft(Exception):
    """The adapter is not a plain LoRA on the base's linear layers: PEFT loads and merges it."""


@dataclass
class DirectLora:
    """A plain LoRA applied without PEFT: each targeted linear layer computes ``W x + s * B (A x)``
    unmerged and is merged as ``W + s * B @ A``, with ``s = lora_alpha / r`` (``/ sqrt(r)`` with
    use_rslora) and the factors in float32.

    That is exactly what PEFT computes for such an adapter (the tests compare the two on real
    adapters, bit for bit), without what PEFT costs here: importing it (and bitsandbytes) and
    wrapping every targeted layer took longer than loading the model. The saved weights name the
    modules, so ``target_modules`` and its kin need no interpretation. Anything else (DoRA,
    ``modules_to_save``, embeddings, tied or offloaded weights, rank patterns, other PEFT types, a
    ``.bin`` adapter) is left to PEFT: :meth:`read` returns None.
    """

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A [r, in], B [out, r])
    scale: float

    @classmethod
    def read(cls, adapter_dir: Path, model: Any) -> DirectLora | None:
        """The adapter's factors when it is a plain LoRA on linear layers of ``model``, else None."""
        try:
            config = json.loads((adapter_dir / "adapter_config.json").read_text())
            _check_plain_lora(config)
            factors = _linear_factors(adapter_dir, model, config["r"])
        except (_NeedsPeft, json.JSONDecodeError) as why:  # PEFT reports what it cannot load either
            log.info("loading the adapter with PEFT: %s", why)
            return None
        r, alpha = config["r"], config["lora_alpha"]
        return cls(factors, alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)

    @contextlib.contextmanager
    def applied(self, model: Any) -> Iterator[None]:
        """Forward passes of ``model`` compute base+adapter, unmerged, as PEFT's LoRA layers do: the
        layer's output plus ``s * B (A x)`` with x in float32."""
        import torch.nn.functional as F

        def lora_hook(a: torch.Tensor, b: torch.Tensor) -> Any:
            def add(module: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
                return output + (F.linear(F.linear(args[0].to(a.dtype), a), b) * self.scale).to(output.dtype)
            return add

        handles = []
        try:
            for name, (a, b) in self.factors.items():
                module = model.get_submodule(name)
                device = module.weight.device
                handles.append(module.register_forward_hook(lora_hook(a.to(device), b.to(device))))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def merge_into(self, model: Any) -> Any:
        """``W += s * B @ A`` in place, as PEFT merges (the update in float32, rounded to the weight's
        dtype, then added); non-finite results are refused."""
        import torch
        from transformers.pytorch_utils import Conv1D

        with torch.no_grad():
            for name, (a, b) in self.factors.items():
                module = model.get_submodule(name)
                weight = module.weight
                delta = (b.to(weight.device) @ a.to(weight.device)) * self.scale
                weight.add_((delta.T if isinstance(module, Conv1D) else delta).to(weight.dtype))
                if not torch.isfinite(weight).all():
                    raise VerificationFailed(f"merging produced invalid weights: non-finite values in {name}")
        return model


def _check_plain_lora(config: dict[str, Any]) -> None:
    if config.get("peft_type") != "LORA":
        raise _NeedsPeft(f"peft_type is {config.get('peft_type')}")
    if not all(isinstance(config.get(k), int | float) and config[k] > 0 for k in ("r", "lora_alpha")):
        raise _NeedsPeft("r or lora_alpha is not a positive number")
    if config.get("init_lora_weights", True) not in (True, False):  # PiSSA, OLoRA, ... change the base
        raise _NeedsPeft(f"init_lora_weights is {config['init_lora_weights']!r}")
    on = sorted(k for k, v in config.items() if k not in LORA_HANDLED_FIELDS and v and v != "none")
    if on:
        raise _NeedsPeft(f"it sets {', '.join(on)}")


def _linear_factors(adapter_dir: Path, model: Any, r: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) in float32 per module, checked against the base's linear layers."""
    import torch
    from safetensors.torch import load_file
    from transformers.pytorch_utils import Conv1D

    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        raise _NeedsPeft("no adapter_model.safetensors")
    weights = load_file(str(path))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        if not (match := LORA_KEY.fullmatch(key)):
            raise _NeedsPeft(f"it saves {key}")
        pairs.setdefault(match["module"], {})[match["factor"]] = tensor
    modules = dict(model.named_modules())
    uses = collections.Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    factors = {}
    for name, pair in pairs.items():
        module = modules.get(name)
        if not isinstance(module, torch.nn.Linear | Conv1D):
            raise _NeedsPeft(f"{name} is not a linear layer of the base")
        out_features, in_features = module.weight.shape
        if isinstance(module, Conv1D):  # its weight is [in, out]
            in_features, out_features = out_features, in_features
        a, b = pair.get("A"), pair.get("B")
        if a is None or b is None or a.shape != (r, in_features) or b.shape != (out_features, r):
            raise _NeedsPeft(f"the factors of {name} do not fit its shape")
        if uses[id(module.weight)] > 1 or module.weight.device.type == "meta":
            raise _NeedsPeft(f"the weight of {name} is tied to another module or offloaded")
        factors[name] = (a.float(), b.float())
    return factors


def load_adapter(model: Any, adapter_dir: Path, base: api.ModelSource) -> Any:
    """``PeftModel.from_pretrained``, refusing adapters whose weights do not all fit the base."""
    from peft import PeftModel, get_peft_model_state_dict

    resize_for_adapter(model, adapter_dir)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            peft_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()
        raise InvalidAdapter(f"the adapter does not fit the base model {base.display()}: "
                             f"{' '.join(line.strip() for line in first[:3])[:600]}") from err
    missing = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    saved = _saved_keys(adapter_dir)
    expected = set(get_peft_model_state_dict(peft_model).keys())
    unexpected = sorted(saved - expected) if saved is not None else []
    if missing or unexpected:
        detail = missing[0][:300] if missing else f"weights for modules the base does not have: {unexpected[:3]}"
        raise InvalidAdapter(f"the adapter does not fit the base model {base.display()}: {detail}")
    return peft_model.eval()


def _saved_keys(adapter_dir: Path) -> set[str] | None:
    from safetensors import safe_open

    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as fh:
        return set(fh.keys())


def resize_for_adapter(model: Any, adapter_dir: Path) -> None:
    """Grow the base's vocabulary when the adapter was trained with added tokens (saved embeddings)."""
    from safetensors import safe_open

    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        return
    name = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    keys = {f"base_model.model.{name}.weight", f"base_model.model.{name}.base_layer.weight"}
    with safe_open(str(path), "pt") as fh:
        rows = {fh.get_slice(k).get_shape()[0] for k in fh.keys() if k in keys}
    current = model.get_input_embeddings().weight.shape[0]
    if len(rows) == 1 and (wanted := rows.pop()) != current:
        log.info("the adapter was trained with %d token embeddings (base: %d): resizing", wanted, current)
        model.resize_token_embeddings(wanted)


# ----------------------------------------------------------------------------------------------
# 5-6. Verification and merge
# ----------------------------------------------------------------------------------------------


class Probes(NamedTuple):
    """The probe inputs as one batch, padded on the right."""

    ids: torch.Tensor  # [probes, longest]
    mask: torch.Tensor  # 1 on each probe's own tokens, 0 on padding

    @property
    def tokens(self) -> int:
        return int(self.mask.sum())


def probe_inputs(tokenizer: Any, prompts: list[str]) -> Probes:
    """Token ids of the fixed probe texts, plus the first verify prompts as chat turns."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    texts = [(t, True) for t in PROBE_TEXTS] + [(_chat(tokenizer, p), False) for p in prompts[:PROBE_PROMPTS]]
    rows = [torch.tensor(tokenizer(text, add_special_tokens=special, truncation=True,
                                   max_length=PROBE_MAX_TOKENS)["input_ids"]) for text, special in texts]
    masks = [torch.ones_like(row) for row in rows]
    return Probes(pad_sequence(rows, batch_first=True), pad_sequence(masks, batch_first=True))


def _chat(tokenizer: Any, prompt: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True))
    return prompt


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def logits(model: Any, probes: Probes) -> torch.Tensor:
    """Logits of every probe token [tokens, vocab], computed in float32, kept on the CPU.

    One forward pass for all probes: the padding follows each probe's tokens, so causal attention
    keeps it out of them (and the mask out of everything).
    """
    import torch

    device = _device(model)
    with torch.no_grad(), float32_compute(model):
        out = model(input_ids=probes.ids.to(device), attention_mask=probes.mask.to(device)).logits
    return out[probes.mask.to(out.device).bool()].float().cpu()


@contextlib.contextmanager
def float32_compute(model: Any) -> Iterator[None]:
    """Run forward passes in float32 while the weights stay in their dtype (one module upcast at a time).

    In bfloat16 arithmetic two equivalent computations of SmolLM2 already differ by as much as a mild
    adapter changes the logits, so a bf16-computed check could not tell a merged model from its
    base. Computed in float32, the check sees what the merge really changed: the merged weights
    rounded to the dtype. Costs one module's float32 copy at a time, never a second model.
    """
    import torch

    modules = [m for m in model.modules()
               if any(p is not None and p.is_floating_point() and p.dtype != torch.float32
                      for p in m._parameters.values())]
    saved: dict[int, dict[str, Any]] = {}

    def upcast(module: Any, args: Any) -> None:
        saved[id(module)] = dict(module._parameters)
        for name, param in module._parameters.items():
            if param is not None and param.is_floating_point() and param.dtype != torch.float32:
                module._parameters[name] = param.detach().float()

    def restore(module: Any, args: Any, output: Any) -> None:
        module._parameters.update(saved.pop(id(module)))

    handles = [h for m in modules for h in (m.register_forward_pre_hook(upcast), m.register_forward_hook(restore))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module in modules:  # after an exception inside a forward
            if id(module) in saved:
                module._parameters.update(saved.pop(id(module)))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def check(diff: float, tolerance: float, what: str) -> None:
    if not diff <= tolerance:  # NaN fails too
        raise VerificationFailed(
            f"{what} differs from base+adapter by {diff:.4g} in the logits (tolerance {tolerance:.4g}): "
            "nothing was published"
        )


def warn_if_untrained(adapter_dir: Path) -> None:
    """Warn when every lora_B is zero: the LoRA layers change nothing (an untrained adapter?), and the
    check cannot tell the merged model from its base. Read from the weights: no forward pass."""
    from safetensors import safe_open

    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        return
    with safe_open(str(path), "pt") as fh:
        factors = [k for k in fh.keys() if ".lora_B" in k or ".lora_embedding_B" in k]
        if factors and not any(fh.get_tensor(k).any() for k in factors):
            log.warning("every lora_B weight of the adapter is zero: its LoRA layers change nothing (an "
                        "untrained adapter?)")


def merge_peft(peft_model: Any) -> Any:
    """PEFT's ``merge_and_unload(safe_merge=True)``, after untying an adapted tied embedding."""
    untie_adapted_embeddings(peft_model)
    try:
        return peft_model.merge_and_unload(safe_merge=True, progressbar=False)
    except ValueError as err:  # safe_merge found NaNs
        raise VerificationFailed(f"merging produced invalid weights: {err}") from err


def untie_adapted_embeddings(peft_model: Any) -> None:
    """Give lm_head its own weight when it shares it with an adapted embedding (or vice versa).

    Merging a LoRA on ``embed_tokens`` in place would otherwise change the tied ``lm_head`` too,
    which the unmerged model never did. (PEFT already unties for ``modules_to_save``; with
    ``ensure_weight_tying`` the adapter is meant for both and they stay tied.)
    """
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = peft_model.get_base_model()
    config = peft_model.peft_config[peft_model.active_adapter]
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is None or getattr(config, "ensure_weight_tying", False):
        return
    inp_layer = inp.get_base_layer() if isinstance(inp, BaseTunerLayer) else inp
    out_layer = out.get_base_layer() if isinstance(out, BaseTunerLayer) else out
    tied = inp_layer.weight is out_layer.weight
    adapted = isinstance(inp, BaseTunerLayer) or isinstance(out, BaseTunerLayer)
    if tied and adapted:
        log.info("untying lm_head from the adapted input embeddings before merging")
        out_layer.weight = torch.nn.Parameter(inp_layer.weight.detach().clone(), requires_grad=False)
        for cfg in (model.config, getattr(model.config, "text_config", None)):
            if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
                cfg.tie_word_embeddings = False


def generate_samples(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int) -> list[dict[str, str]]:
    """Greedy generations for the verify prompts (chat template when the tokenizer has one)."""
    import torch

    config = copy.deepcopy(model.generation_config)
    config.do_sample, config.temperature, config.top_p, config.top_k = False, None, None, None
    config.max_new_tokens = max_new_tokens
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    samples = []
    for prompt in prompts:
        enc = tokenizer(_chat(tokenizer, prompt), add_special_tokens=not getattr(tokenizer, "chat_template", None),
                        return_tensors="pt").to(_device(model))
        # On the CPU, float32 arithmetic is both faster than emulated bf16/fp16 and closer to the weights.
        compute = float32_compute(model) if _device(model).type == "cpu" else contextlib.nullcontext()
        with torch.no_grad(), compute:
            out = model.generate(**enc, generation_config=config)
        text = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        samples.append({"prompt": prompt, "output": text.strip()})
    return samples


# ----------------------------------------------------------------------------------------------
# 7. Saving
# ----------------------------------------------------------------------------------------------


def save_merged(model: Any, tokenizer: Any, out: Path, max_shard_size: str | int) -> None:
    """Sharded safetensors + config + generation config + tokenizer; never adapter files."""
    model.save_pretrained(out, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    for stray in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        (out / stray).unlink(missing_ok=True)


def write_model_card(out: Path, base: api.ModelSource, adapter_uri: str, dtype: str,
                     verification: dict[str, Any]) -> None:
    (out / "README.md").write_text(
        f"# Merged model\n\nBase model `{_describe(base)}` with the LoRA adapter `{adapter_uri}` merged in "
        f"(merge-and-unload), saved in {dtype} by kubetune.\n\n"
        f"Verified: the largest logit difference to base+adapter on the probe inputs is "
        f"{verification['maxLogitDiff']:.3g} (tolerance {verification['tolerance']:.3g}).\n\n"
        "Load it with `AutoModelForCausalLM.from_pretrained(<this folder>)`; it needs no PEFT.\n"
    )


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


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
