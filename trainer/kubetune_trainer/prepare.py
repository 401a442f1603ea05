"""Prepared data: the dataset checked, formatted and tokenized once, stored content-addressed, so
a retry, a resume or a later job with the same data and tokenizer never tokenizes again
(docs/trainer.md, "Prepared data")::

    kubetune prepare --spec finetune.json    # this stage alone (CPU only: no model weights move)
    kubetune train --spec finetune.json      # prepares first when nothing is stored, then trains

Where: ``.kubetune/prepared/<key>/`` in the folder that holds ``output.uri`` (an S3 prefix or a
local folder), so jobs whose outputs share a folder share it:

* ``train.parquet`` and ``eval.parquet``: ``input_ids`` and ``labels`` (-100 where no loss), as
  TRL's SFTTrainer takes them (:func:`kubetune_trainer.data.tokenize`); the evaluation rows after
  ``dataset.eval.maxSamples``;
* ``report.json``: rows, tokens, a length histogram, the key and what it hashes;
* ``manifest.json`` last, with every file's sha256 (a folder without one is not prepared data).

The key hashes what decides those files: the dataset spec (without its Secret) and its content
(ETags, or local files' sha256), the model (the tokenizer and chat template come from it: name and
revision, or uri and its content), ``training.seed`` (the held-out split), the tokenizing library
versions and :data:`FORMAT`. ``training.maxLength``, packing and ``maxTruncatedFraction`` are not
in it: the token checks, a counting pass, run on every use with this job's settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune import api, contract
from kubetune_trainer import data, fingerprint, memory, modeling
from kubetune_trainer.distributed import Ranks
from kubetune_trainer.runtime import InsufficientGPUMemory, PodContext
from kubetune_trainer.storage import Store, is_s3, join, read_manifest, split_s3, verify_files, write_manifest

log = logging.getLogger("kubetune.prepare")

FORMAT = 1  # bump when the stored layout or the tokenization changes
PREPARED_DIR = ".kubetune/prepared"
SPLITS = ("train", "eval")
HISTOGRAM_FIRST = 64  # token-length buckets: <=64, <=128, ... doubling up to the longest sample


@dataclass
class Prepared:
    """The tokenized splits SFTTrainer takes, and what they hold."""

    train: Any  # datasets.Dataset: input_ids, labels
    eval: Any | None
    uri: str  # where they are stored (content-addressed)
    reused: bool  # found in storage (not tokenized by this process)
    rows: dict[str, int]  # trainingRows, evalRows (before maxSamples)


def root(output_uri: str) -> str:
    """Where prepared data lives for a job writing to ``output_uri``: next to it, in its parent
    folder (``s3://models/runs/a`` -> ``s3://models/runs/.kubetune/prepared``), so jobs whose outputs
    share a folder share it, within what their credentials may write."""
    uri = output_uri.rstrip("/")
    if is_s3(uri):
        bucket, key = split_s3(uri)
        parent = key.rpartition("/")[0]
        return f"s3://{bucket}/{parent + '/' if parent else ''}{PREPARED_DIR}"
    return str(Path(uri.removeprefix("file://")).resolve().parent / PREPARED_DIR)


def key_inputs(spec: api.FineTuneJobSpec, inputs: dict[str, Any]) -> dict[str, Any]:
    """What the key hashes, from the spec and the run's fingerprint inputs (content digests)."""
    import datasets
    import tokenizers
    import transformers

    dataset = {k: v for k, v in (spec.dataset.to_wire() or {}).items() if k != "secretRef"}
    model = {k: v for k, v in (spec.model.to_wire() or {}).items() if k != "secretRef"}
    rows_of = {"orpo": "dpo"}.get(spec.method, spec.method)  # orpo trains on dpo's pairs; kto splits them
    method = {"method": rows_of} if rows_of != "sft" else {}
    return {"format": FORMAT, **method, "dataset": dataset, "datasetContent": inputs.get("datasetContent"),
            "model": model, "modelContent": inputs.get("modelContent"), "seed": spec.training.seed,
            "versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                         "datasets": datasets.__version__}}


def key_of(doc: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


def prepare(spec: api.FineTuneJobSpec, ctx: PodContext, store: Store, tokenizer: Any, assistant_only: bool,
            chat_template: str | None, inputs: dict[str, Any], ranks: Ranks | None = None) -> Prepared:
    """The tokenized splits: reused from storage when this key is there and intact, else loaded,
    checked row by row (InvalidDataset names the row), tokenized, stored and then used from the
    stored files. With several ranks, global rank 0 prepares; the other pods download its files."""
    ranks = ranks or Ranks()
    doc = key_inputs(spec, inputs)
    uri = join(root(spec.output.uri), key_of(doc))
    local = ctx.work_dir / "prepared" / key_of(doc)
    reused = True
    if ranks.main:
        reused = fetch(store, uri, local)
        if not reused:
            build(spec, ctx, store, tokenizer, assistant_only, chat_template, doc, uri, local, ranks)
    ranks.barrier()  # rank 0 stored them (or failed: torchrun then stops every rank)
    folder = ranks.per_pod(lambda: local if ranks.main or fetch(store, uri, local) else None)
    if folder is None:
        from kubetune_trainer.runtime import StorageError

        raise StorageError(f"the prepared data at {uri} is missing or damaged after rank 0 stored it")
    report = json.loads((Path(folder) / "report.json").read_text())
    cache = ranks.work_dir(ctx.work_dir) / data.CACHE_DIR
    splits = {name: load_parquet(Path(folder) / f"{name}.parquet", cache)
              for name in SPLITS if (Path(folder) / f"{name}.parquet").is_file()}
    return Prepared(train=splits["train"], eval=splits.get("eval"), uri=uri, reused=reused,
                    rows={"trainingRows": report["trainingRows"], "evalRows": report["evalRows"]})


def fetch(store: Store, uri: str, local: Path) -> bool:
    """Download the prepared data at ``uri`` into ``local`` and check every file against its
    manifest; False when none is stored there or a file is missing or damaged (it is prepared again)."""
    manifest = read_manifest(store, uri)
    if manifest is None:
        return False
    if local.is_dir() and not verify_files(local, manifest):
        return True  # this pod has it already (a retry on the same node's work dir)
    shutil.rmtree(local, ignore_errors=True)
    for rel in manifest.get("files", {}):
        store.download_file(join(uri, rel), local / rel)
    bad = verify_files(local, manifest)
    if bad:
        log.warning("the prepared data at %s is damaged (%s): preparing it again", uri, ", ".join(bad))
        shutil.rmtree(local, ignore_errors=True)
        return False
    log.info("reusing the prepared data at %s (created %s by %s)", uri, manifest.get("createdAt"),
             (manifest.get("owner") or {}).get("name") or "a local run")
    return True


def build(spec: api.FineTuneJobSpec, ctx: PodContext, store: Store, tokenizer: Any, assistant_only: bool,
          chat_template: str | None, doc: dict[str, Any], uri: str, local: Path, ranks: Ranks) -> None:
    """Load and check the rows, tokenize, write the parquet files and report, store them (manifest last)."""
    ctx.reporter.patch({"stage": f"preparing: loading dataset {spec.dataset.uri}"})
    splits = data.load_splits(spec.dataset, store, ranks.work_dir(ctx.work_dir), spec.training.seed)
    ctx.reporter.patch({"stage": f"preparing: tokenizing {len(splits.train)} samples"})
    unpaired = spec.method == "kto"  # kto on preference pairs: a desirable and an undesirable row each
    tokenized = {"train": data.tokenize(splits.train, tokenizer, assistant_only, chat_template, unpaired=unpaired)}
    if splits.eval is not None:
        rows = eval_subset(splits.eval, spec.dataset.eval.max_samples if spec.dataset.eval else None,
                           spec.training.seed)
        tokenized["eval"] = data.tokenize(rows, tokenizer, assistant_only, chat_template, unpaired=unpaired)
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir(parents=True)
    for name, ds in tokenized.items():
        ds.to_parquet(str(local / f"{name}.parquet"))
    report = {"key": key_of(doc), "keyInputs": doc, "assistantOnly": assistant_only,
              "trainingRows": len(splits.train), "evalRows": len(splits.eval) if splits.eval is not None else 0,
              "evalSamples": len(tokenized["eval"]) if "eval" in tokenized else 0,
              "tokens": token_count(tokenized["train"]), "lengthHistogram": length_histogram(tokenized["train"])}
    (local / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    ctx.reporter.patch({"stage": "preparing: storing the tokenized data"})
    files = store.upload_dir(local, uri)
    write_manifest(store, uri, files, kind="PreparedData", key=report["key"], keyInputs=doc,
                   owner=fingerprint.owner(ctx.name, ctx.namespace))
    log.info("prepared %d training samples (%d tokens) at %s", report["trainingRows"], report["tokens"], uri)


def load_parquet(path: Path, cache: Path) -> Any:
    """A stored split as a memory-mapped ``datasets.Dataset`` (Arrow files in ``cache``)."""
    import datasets

    return datasets.Dataset.from_parquet(str(path), cache_dir=str(cache))


def eval_subset(rows: Any, max_samples: int | None, seed: int) -> Any:
    """At most ``max_samples`` evaluation rows, a seeded random subset (dataset.eval.maxSamples)."""
    if max_samples is None or len(rows) <= max_samples:
        return rows
    log.info("evaluating on %d of %d evaluation rows (dataset.eval.maxSamples)", max_samples, len(rows))
    return rows.shuffle(seed=seed).select(range(max_samples))


def lengths(ds: Any) -> Any:
    """Each sample's tokens: its input_ids, a preference pair's prompt and longer answer (a sequence
    DPO trains on), or a feedback row's prompt and completion (KTO)."""
    for batch in ds.iter(batch_size=10_000):
        if "input_ids" in batch:
            yield from (len(ids) for ids in batch["input_ids"])
        elif "completion_ids" in batch:
            yield from (len(p) + len(c) for p, c in zip(batch["prompt_ids"], batch["completion_ids"], strict=True))
        else:
            yield from (len(p) + max(len(c), len(r)) for p, c, r in
                        zip(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"], strict=True))


def token_count(ds: Any) -> int:
    return sum(lengths(ds))


def length_histogram(ds: Any) -> dict[str, int]:
    """Samples per token-length bucket: ``"<=64"``, ``"<=128"``, ... (doubling), empty ones left out."""
    counts: dict[int, int] = {}
    for length in lengths(ds):
        edge = HISTOGRAM_FIRST
        while edge < length:
            edge *= 2
        counts[edge] = counts.get(edge, 0) + 1
    return {f"<={edge}": counts[edge] for edge in sorted(counts)}


def check(spec: api.FineTuneJobSpec, prepared: Prepared, assistant_only: bool) -> dict[str, Any]:
    """The token checks with this job's settings (InvalidDataset names the rows); returns status.data."""
    t = spec.training
    settings = spec.method_settings()
    if settings is not None:
        limit = settings.max_prompt_length
        pairs = data.check_pairs(prepared.train, t.max_length, limit, max_truncated_fraction=t.max_truncated_fraction,
                                 setting=f"{spec.method}.maxPromptLength")
        return {**prepared.rows, "evalSamples": len(prepared.eval) if prepared.eval is not None else 0,
                "tokens": pairs.tokens, "samplesOverMaxLength": pairs.truncated, "truncatedSamples": pairs.truncated,
                "truncatedTokens": pairs.truncated_tokens, "preparedUri": prepared.uri,
                **({"trainingRows": pairs.pairs, "desirableSamples": pairs.desirable} if spec.method == "kto" else {})}
    stats = data.check_tokens(prepared.train, t.max_length, t.packing, assistant_only,
                              max_truncated_fraction=t.max_truncated_fraction)
    return data_report(prepared, stats)


def data_report(prepared: Prepared, stats: data.TokenStats) -> dict[str, Any]:
    """status.data: the rows, tokens and truncation this job trains on, and where they are stored."""
    return {**prepared.rows, "evalSamples": len(prepared.eval) if prepared.eval is not None else 0,
            "tokens": stats.tokens, "trainableTokens": stats.trainable, "samplesOverMaxLength": stats.too_long,
            "truncatedSamples": stats.truncated_samples, "truncatedTokens": stats.truncated_tokens,
            "preparedUri": prepared.uri}


def tokenizer_for(spec: api.FineTuneJobSpec, store: Store, work: Path, ranks: Ranks) -> str:
    """The tokenizer (and config) files only: no weights move for preparing."""
    return ranks.per_pod(lambda: modeling.resolve_model(spec.model, store, work, tokenizer_only=True))


def fits(spec: api.FineTuneJobSpec, ctx: PodContext, model_path: str, device: int = 0) -> memory.Plan:
    """Will it fit? The estimated peak GPU memory against the GPUs the job gets
    (:mod:`kubetune_trainer.memory`), in status.memory; InsufficientGPUMemory, saying what would fit,
    when it does not. Resolves ``quantization.bits: auto`` (the returned Plan's bits)."""
    ctx.reporter.patch({"stage": "preparing: estimating the GPU memory"})
    plan = memory.check(spec, model_path, varlen=spec.resources.gpus > 0 and modeling.varlen_kernel(), device=device)
    ctx.reporter.patch({"memory": plan.status()})
    if not plan.fits:
        raise InsufficientGPUMemory(memory.refusal(plan))
    return plan


def run(spec: api.FineTuneJobSpec, ctx: PodContext) -> dict[str, Any]:
    """``kubetune prepare``: this stage alone, on CPUs, with the same checks and reasons as training
    (OutputConflict when output.uri holds another run's result; InvalidDataset names the row; a
    missing model or dataset is permanent). With a model cache
    mounted (spec.modelCache), an s3:// base model is then stored there, so the GPU pod reads it
    from the volume instead of downloading it. Returns status.data."""
    from kubetune_trainer.sft import assistant_only_loss, bind_output

    store = Store.from_spec(spec.storage)
    inputs, _, finished, _ = bind_output(spec, store, ctx)  # another run's output: OutputConflict, before any GPU
    if finished is not None:
        log.info("%s is already complete: nothing to prepare (the GPU pod returns its result)", spec.output.uri)
        return {}
    tokenizer_path = tokenizer_for(spec, store, ctx.work_dir, Ranks())
    tokenizer = modeling.load_tokenizer(tokenizer_path, spec.model)
    assistant_only, chat_template = assistant_only_loss(spec.dataset, tokenizer)
    prepared = prepare(spec, ctx, store, tokenizer, assistant_only, chat_template, inputs)
    report = check(spec, prepared, assistant_only)
    ctx.reporter.patch({"data": report})
    fits(spec, ctx, tokenizer_path)  # from the config alone, after the data's own checks
    if spec.model.uri and os.environ.get(contract.ENV_MODEL_CACHE):  # the model moves once, before any GPU waits
        ctx.reporter.patch({"stage": "preparing: staging the base model in the model cache"})
        modeling.resolve_model(spec.model, store, ctx.work_dir)
    ctx.reporter.patch({"stage": "prepared: waiting for the GPU Job"})
    log.info("data %s at %s", "already prepared" if prepared.reused else "prepared", prepared.uri)
    return {"data": report}
