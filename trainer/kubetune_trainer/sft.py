"""FineTuneJob recipe: packed QLoRA supervised fine-tuning, from a spec to an adapter in storage.

What the trainer pod runs (the operator mounts the resolved spec), and how to run it by hand::

    kubetune train --spec finetune.json          # in the pod: KUBETUNE_* env, AWS_* from the Secret
    kubetune run examples/finetunejob.yaml --output ./out --max-steps 20   # locally, no cluster

    # finetune.json (a FineTuneJobSpec; a whole manifest works too)
    {"model": {"uri": "s3://models/llama-3.2-1b"},            # or {"name": "<hub id or local path>"}
     "quantization": {"bits": 4},                            # NF4 + double quant (QLoRA); 16 = plain LoRA
     "dataset": {"source": "jsonl", "uri": "s3://data/qa.jsonl", "format": "template",
                 "template": "Question: {question}\\n\\nAnswer: {answer}", "eval": {"fraction": 0.05}},
     "training": {"maxSteps": 500, "maxLength": 1024, "packing": "bfd", "saveSteps": 100},
     "output": {"uri": "s3://models/run-1"},
     "storage": {"endpoint": "http://minio.storage:9000"}}

Steps, top-down in :func:`train`:

1. Bound to the spec (:mod:`kubetune_trainer.fingerprint`): a ``manifest.json`` with this run's
   fingerprint means complete, its result is returned (a retried pod after a success does no work);
   a manifest or checkpoints of another run are refused (OutputConflict, naming their owner and what
   differs). Then check the output is writable before any heavy work.
2. Tokenizer (only the tokenizer files are fetched: no weights move before the data is good).
3. Prepared data (:mod:`kubetune_trainer.prepare`): when a retry, a resume or another job already
   prepared this data with this tokenizer, its stored files are used and nothing is tokenized;
   else load, check and format (:mod:`kubetune_trainer.data`; bad data fails here, naming the
   row), tokenize once, batched, into TRL's pre-tokenized layout (``input_ids``/``labels``), and
   store it content-addressed. Then the token-level checks on exactly those labels: truncated
   samples over ``maxTruncatedFraction``, zero trainable tokens. At most
   ``dataset.eval.maxSamples`` evaluation samples.
4. The base model (4-bit NF4 by default, :mod:`kubetune_trainer.modeling`), LoRA via peft.
5. TRL ``SFTTrainer``: packing ``bfd`` (no attention across packed samples: position_ids restart
   at every sample, no attention mask) or ``wrapped`` (classic constant-length rows) or none.
   Callbacks: progress into ``status.progress`` (throttled), the watchdog (Diverged, Stalled:
   :mod:`kubetune_trainer.watchdog`), checkpoint upload + ``latest.json`` pointer, SIGTERM ->
   checkpoint -> exit 7. ``training.seed`` is set before the adapter is built (seeded LoRA init).
6. Resume from the newest intact checkpoint of this run in storage, if any; train; evaluate once
   more at the end unless the last step just did.
7. Publish: adapter (PEFT format + tokenizer, with its own ``manifest.json`` for the MergeJob),
   ``spec.json``, ``report.md``, ``loss.png``, the offline W&B run; ``manifest.json`` LAST.

Returns the status result: ``adapterUri``, ``checkpointUri``, ``reportUri``, ``wandbUrl``, ``progress``.

Raises (exit codes in :mod:`kubetune.contract`):
    OutputConflict: ``output.uri`` holds another run's result or checkpoints. Nothing is touched.
    InvalidDataset: the data cannot train (names the column, row and fix). No model is loaded.
    Diverged / Stalled: the watchdog stopped the run; the last good checkpoint is kept and named.
    StorageError: output not writable; a download or upload failed after retries (no manifest).
    Preempted: SIGTERM; a checkpoint was stored first, so the retry resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubetune import api, contract
from kubetune_trainer import checkpoints, fingerprint, memory, modeling, prepare, report, watchdog
from kubetune_trainer.distributed import Ranks
from kubetune_trainer.runtime import InvalidSpec, PodContext, Preempted, StorageError
from kubetune_trainer.storage import Store, join, read_manifest, write_manifest

log = logging.getLogger("kubetune.sft")

DEFAULT_EVAL_EVERY = 0.2  # a fraction of the total steps: 5 evaluations a run (plus the final one)


def train(spec: api.FineTuneJobSpec, ctx: PodContext, echo: Callable[[str], None] | None = None,
          ranks: Ranks | None = None) -> dict[str, Any]:
    """Run the fine-tune described by ``spec``; returns the result for the resource status.

    ``ranks``: this process's place when torchrun runs several (:mod:`kubetune_trainer.distributed`):
    every rank reads and tokenizes the data and trains; each pod's local rank 0 downloads the model
    and checkpoint for its pod; only global rank 0 writes (storage, status, W&B, the result)."""
    ranks = ranks or Ranks()
    out = spec.output.uri.rstrip("/")
    store = Store.from_spec(spec.storage)
    work = ctx.work_dir

    # 1. Bound to the spec: a complete run with this fingerprint is never trained twice; another
    #    run's result or checkpoints at this output are refused, before any data or model moves.
    inputs, stamp, finished, pointer = bind_output(spec, store, ctx)
    if finished is not None:
        log.info("%s is already complete (created %s): nothing to do", out, finished.get("createdAt"))
        return dict(finished.get("result") or {})
    if ranks.main:
        store.check_writable(out)

    # 2-3. Data: the tokenizer only (no weights), then the prepared data (kubetune_trainer.prepare):
    #      reused from storage when a retry, a resume or another job prepared the same data, else
    #      every row-level check, tokenized once, stored. Then the token checks on exactly those labels.
    tokenizer_path = prepare.tokenizer_for(spec, store, work, ranks)
    tokenizer = modeling.load_tokenizer(tokenizer_path, spec.model)
    assistant_only, chat_template = assistant_only_loss(spec.dataset, tokenizer)
    prepared = prepare.prepare(spec, ctx, store, tokenizer, assistant_only, chat_template, inputs, ranks)
    if prepared.reused:
        log.info("no tokenization here: %d training samples prepared at %s", len(prepared.train), prepared.uri)
    train_set, eval_set = prepared.train, prepared.eval
    data_stats = prepare.check(spec, prepared, assistant_only)
    ctx.reporter.patch({"data": data_stats})
    # Will it fit? (the prepare stage checked already; inline, this is the check) bits: auto -> 4 or 16.
    spec = memory.with_bits(spec, prepare.fits(spec, ctx, tokenizer_path, ranks.local_rank).bits)

    # 4. Base model + LoRA.
    ctx.reporter.patch({"stage": f"loading model {spec.model.display()}"})
    model_path = ranks.per_pod(lambda: modeling.resolve_model(spec.model, store, work))
    strategy = modeling.distributed_strategy(spec.training.distributed, ranks.world, model_path, spec.model,
                                             ranks.local_rank)
    if strategy == "fsdp" and spec.training.keep_best:
        raise InvalidSpec("training.keepBest is not available with FSDP (training.distributed) yet: the best "
                          "checkpoint's adapter cannot be loaded into a sharded model; use ddp or unset keepBest")
    model = modeling.load_model(model_path, spec.model, spec.quantization, spec.training.gradient_checkpointing,
                                device=ranks.local_rank, fsdp=strategy == "fsdp")
    adapter_from = ranks.per_pod(lambda: modeling.resolve_adapter(spec.model, store, work))
    if adapter_from is not None:  # continue that adapter (DPO after SFT): no new one
        model = modeling.continue_adapter(model, adapter_from)

    # 5. Trainer with its callbacks.
    from transformers import set_seed

    from kubetune_trainer.callbacks import ProgressReporter

    wandb_on = setup_wandb(spec.tracking, ctx, work)
    progress = ProgressReporter(ctx.reporter, echo if ranks.main else None)
    best = checkpoints.BestCheckpoint(spec.training.early_stopping, spec.training.keep_best)
    uploader = checkpoints.CheckpointUploader(store, out, spec.training.keep_checkpoints, ctx.reporter, stamp,
                                              protect=lambda: best.best_step if best.keep_best else None,
                                              ranks=ranks)
    guard = watchdog.Watchdog(spec.training.watchdog, lambda: (uploader.last or pointer or {}).get("uri"),
                              on_stall=lambda err: watchdog.exit_process(ctx.termination_log, err))
    preemption = checkpoints.PreemptionHandler(ranks).install()
    try:
        set_seed(spec.training.seed)  # TRL builds the LoRA adapter before Trainer seeds: seed its init too
        trainer = trainer_class(spec.method)(
            model=model,
            args=sft_config(spec.training, work / "trainer", has_eval=eval_set is not None, wandb=wandb_on,
                            run_name=ctx.name, varlen_attention=model.config._attn_implementation.startswith("flash"),
                            ranks=ranks.world, fsdp=strategy == "fsdp", method=spec.method_settings()),
            train_dataset=train_set,
            eval_dataset=eval_set,
            processing_class=tokenizer,
            peft_config=None if adapter_from is not None else modeling.lora_config(spec.lora),
            callbacks=[progress, best, guard, uploader, preemption],  # the watchdog checks before any upload
        )
        if chat_template is not None and not assistant_only:
            log.info("the chat template has no {%% generation %%} markers: training on whole conversations")
        if strategy != "fsdp":  # FSDP keeps one dtype per unit: the adapter computes in the storage dtype
            adapter_in_float32(trainer.model)

        # 6. Resume from storage, then train.
        resume = ranks.per_pod(lambda: checkpoints.download_latest(store, out, work, stamp["fingerprint"]))
        if ranks.any(preemption.requested):
            raise Preempted("SIGTERM before training started: nothing to save, a retry starts over")
        ctx.reporter.patch({"stage": f"training from step {resume[1] if resume else 0}"})
        if resume and finished_checkpoint(resume[0]):
            # Stopped (SIGTERM, a killed pod) after its last step was saved: HF would train one step past
            # maxSteps from there, so the checkpoint is the final adapter and state, published as it is.
            train_metrics = restore_finished(trainer, resume[0], progress)
        else:
            train_metrics = trainer.train(resume_from_checkpoint=str(resume[0]) if resume else None).metrics
        if ranks.any(preemption.requested):
            where = uploader.last["uri"] if uploader.last else "no checkpoint"
            raise Preempted(f"stopped on SIGTERM at step {trainer.state.global_step}; checkpoint {where}")
        if eval_set is not None and not evaluated_at(trainer.state.log_history, trainer.state.global_step):
            ctx.reporter.patch({"stage": "final evaluation"})
            trainer.evaluate()  # the run always ends with an evaluation of the final adapter
    finally:
        guard.stop()
        preemption.uninstall()

    # 7. Publish (global rank 0; the other ranks wait for it, so a failed publish fails them all):
    #    files first, manifest last.
    results_dir = work / "result"
    if strategy == "fsdp":  # the sharded adapter is gathered to rank 0 to be saved: every rank takes part
        if ranks.main:
            shutil.rmtree(results_dir, ignore_errors=True)
        trainer.save_model(str(results_dir / contract.ADAPTER_DIR))
    if not ranks.main:
        ranks.barrier()
        return {}
    ctx.reporter.patch({"stage": "uploading the adapter and report"})
    wandb_url = finish_wandb(store, work, out) if wandb_on else None
    result: dict[str, Any] = {
        "adapterUri": join(out, contract.ADAPTER_DIR),
        "reportUri": join(out, contract.REPORT),
        "progress": progress.progress,
    }
    last_checkpoint = uploader.last or checkpoints.latest_pointer(store, out)
    if last_checkpoint:
        result["checkpointUri"] = last_checkpoint["uri"]
    if wandb_url:
        result["wandbUrl"] = wandb_url
    log_history = trainer.state.log_history
    metrics = report.metrics_from(log_history, train_metrics, resumed=resume is not None)
    if best.early_stopping or best.keep_best:
        metrics.update(bestStep=best.best_step, bestEvalLoss=best.best_loss, stoppedEarly=best.stopped_early)
    if best.keep_best and best.best_step not in (None, trainer.state.global_step):
        use_best_adapter(trainer.model, store, out, best.best_step, work)
    versions = report.library_versions()

    if strategy != "fsdp":
        shutil.rmtree(results_dir, ignore_errors=True)
        trainer.save_model(str(results_dir / contract.ADAPTER_DIR))  # PEFT adapter + tokenizer
    shutil.rmtree(results_dir / contract.ADAPTER_DIR / "ref", ignore_errors=True)  # DPO's frozen reference copy
    name_the_base(results_dir / contract.ADAPTER_DIR, spec.model)
    files = publish_adapter(store, results_dir / contract.ADAPTER_DIR, out, spec, stamp)
    (results_dir / "spec.json").write_text(json.dumps(spec.to_wire(), indent=2, sort_keys=True))
    report.plot_loss(log_history, results_dir / "loss.png", title=ctx.name or spec.model.display())
    (results_dir / contract.REPORT).write_text(
        report.render_report(ctx.name or "local run", spec, result, metrics, log_history, versions, data_stats))
    for name in ("spec.json", "loss.png", contract.REPORT):
        files[name] = store.upload_file(results_dir / name, join(out, name))
    if wandb_url and (work / "wandb").is_dir() and not wandb_url.startswith("http"):
        files.update({f"wandb/{rel}": sha for rel, sha in store.upload_dir(work / "wandb", join(out, "wandb")).items()})
    write_manifest(store, out, files, kind="FineTuneJob", name=ctx.name, spec=spec.to_wire(), result=result,
                   metrics=metrics, data=data_stats, versions=versions, **stamp)
    log.info("done: adapter at %s", result["adapterUri"])
    ranks.barrier()
    return result


# ----------------------------------------------------------------------------------------------
# Helpers (small, pure where possible, tested on their own)
# ----------------------------------------------------------------------------------------------


def bind_output(spec: api.FineTuneJobSpec, store: Store, ctx: PodContext) -> tuple[
        dict[str, Any], dict[str, Any], dict[str, Any] | None, dict[str, Any] | None]:
    """(fingerprint inputs, the stamp every manifest and checkpoint carries, the output's manifest
    when this very run is complete there, its latest checkpoint pointer). Raises OutputConflict
    when ``output.uri`` holds another run's result or checkpoints (:mod:`kubetune_trainer.fingerprint`)."""
    out = spec.output.uri.rstrip("/")
    inputs = fingerprint.run_inputs(spec, store)
    stamp = {"fingerprint": fingerprint.of(inputs), "fingerprintInputs": inputs,
             "owner": fingerprint.owner(ctx.name, ctx.namespace)}
    finished = read_manifest(store, out)
    if finished is not None:
        fingerprint.check(finished, "the result", out, stamp["fingerprint"], inputs)
    pointer = checkpoints.latest_pointer(store, out)
    if pointer is not None:
        fingerprint.check(pointer, "checkpoints", join(out, contract.CHECKPOINTS_DIR), stamp["fingerprint"], inputs)
    return inputs, stamp, finished, pointer


def assistant_only_loss(dataset: api.Dataset, tokenizer: Any) -> tuple[bool, str | None]:
    """For ``messages``: train on assistant turns only when the chat template can mark them
    (``{% generation %}``, natively or through TRL's training templates); else whole conversations.
    Returns (assistant only?, the chat template to tokenize with; None: the tokenizer's own).

    ``dataset.chatTemplate``, when set, first replaces the tokenizer's template (for every format:
    the saved adapter's tokenizer carries it too); a template Jinja cannot parse is InvalidDataset."""
    if dataset.chat_template is not None:
        from jinja2 import TemplateSyntaxError
        from transformers.utils.chat_template_utils import _compile_jinja_template

        from kubetune_trainer.runtime import InvalidDataset

        try:
            _compile_jinja_template(dataset.chat_template)
        except TemplateSyntaxError as err:
            raise InvalidDataset(f"dataset.chatTemplate is not a valid Jinja template: {err.message} "
                                 f"(line {err.lineno})") from err
        tokenizer.chat_template = dataset.chat_template
    if dataset.format != "messages":
        return False, None
    from trl.chat_template_utils import (
        get_training_chat_template,
        has_generation_markers,
        is_chat_template_stop_token_trained,
    )

    template = tokenizer.chat_template
    if template is None:
        from kubetune_trainer.runtime import InvalidDataset

        raise InvalidDataset("dataset.format is messages but the tokenizer has no chat template")
    patched = None
    if not has_generation_markers(template):
        try:
            patched = get_training_chat_template(tokenizer)
        except ValueError:
            log.info("chat template without {%% generation %%} markers and no TRL training template for it: "
                     "the loss covers whole conversations, not only assistant turns")
            return False, template
        log.info("assistant-only loss with TRL's training version of this chat template")
    if not is_chat_template_stop_token_trained(tokenizer, chat_template=patched):
        log.warning("the chat template leaves the assistant's end-of-turn token out of the loss: "
                    "the model may not learn to stop")
    return True, patched


def optimizer_name(wanted: str) -> str:
    """``auto``: paged AdamW 32-bit on a GPU (QLoRA's choice), plain AdamW on CPU."""
    if wanted != "auto":
        return wanted
    return "paged_adamw_32bit" if modeling.use_cuda() else "adamw_torch"


def micro_batching(t: api.Training, varlen_attention: bool) -> tuple[int, int]:
    """(rows per micro-batch, accumulation steps) for spec.training's batchSize x gradientAccumulationSteps.

    bfd (and bfd_split) packing is padding-free: TRL concatenates a micro-batch into ONE row. Without a varlen kernel
    (flash attention), sdpa then attends over a dense (rows x maxLength)^2 block mask: 4x the attention
    of 4 separate rows, 2.8x slower end to end on an H100 (docs/benchmarks.md). One packed row per
    micro-batch keeps every row at maxLength, with the same tokens (and loss) per optimizer step."""
    if t.packing in ("bfd", "bfd_split") and not varlen_attention and t.batch_size > 1:
        return 1, t.batch_size * t.gradient_accumulation_steps
    return t.batch_size, t.gradient_accumulation_steps


def sft_config(t: api.Training, output_dir: Path, has_eval: bool, wandb: bool, run_name: str | None,
               varlen_attention: bool = False, ranks: int = 1, fsdp: bool = False,
               method: api.Dpo | api.Orpo | api.Kto | None = None) -> Any:
    """TRL SFTConfig from spec.training. bf16 only when asked and the GPU supports it. The datasets
    come tokenized with their labels (:func:`data.tokenize`): TRL only packs them, in this process.

    With several ``ranks`` (torchrun) the Trainer wraps the model in DDP: every rank takes its own
    micro-batches (the global batch is ``ranks`` times a rank's), gradients are averaged, and the
    gradient checkpointing is non-reentrant with no search for unused parameters (the frozen 4-bit
    base has none that DDP tracks). ``fsdp``: FSDP shards the base over the ranks instead (full
    shard, each decoder layer a unit, the LoRA layers units of their own: transformers' FSDP-QLoRA
    path), and the adapter is gathered to rank 0 to be saved.

    ``method`` (spec.dpo, spec.orpo or spec.kto): DPOConfig, ORPOConfig or KTOConfig with the same
    training settings and that method's own, one padded sample (pair, or completion) per row
    instead of packing."""
    import torch
    from trl import SFTConfig

    cuda = modeling.use_cuda()
    bf16, fp16 = modeling.mixed_precision(t.bf16, cuda, torch.cuda.get_device_capability() if cuda else None)
    micro_batch, accumulation = micro_batching(t, varlen_attention) if method is None else (
        t.batch_size, t.gradient_accumulation_steps)  # DPO, ORPO and KTO pad their sequences: no packing
    method_args: dict[str, Any] = {"packing": t.packing != "none"}
    if t.packing != "none":
        method_args["packing_strategy"] = t.packing  # bfd, bfd_split and wrapped are TRL's own names
    config_class: Any = SFTConfig
    if isinstance(method, api.Dpo):
        from trl import DPOConfig

        config_class = DPOConfig
        method_args = {"beta": method.beta, "loss_type": [method.loss_type],
                       "label_smoothing": method.label_smoothing}
    elif isinstance(method, api.Orpo):
        from trl.experimental.orpo import ORPOConfig

        config_class = ORPOConfig
        method_args = {"beta": method.beta}
    elif isinstance(method, api.Kto):
        from trl import KTOConfig

        config_class = KTOConfig  # trains in a fixed order (its KL term pairs neighbours): shuffled once, seeded
        method_args = {"beta": method.beta, "loss_type": method.loss_type, "desirable_weight": method.desirable_weight,
                       "undesirable_weight": method.undesirable_weight, "train_sampling_strategy": "sequential"}
    return config_class(
        output_dir=str(output_dir),
        run_name=run_name,
        seed=t.seed,
        max_steps=t.max_steps if t.max_steps else -1,
        num_train_epochs=t.epochs if t.epochs else 1.0,
        per_device_train_batch_size=micro_batch,
        per_device_eval_batch_size=micro_batch,
        gradient_accumulation_steps=accumulation,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a fraction < 1 is a ratio of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=optimizer_name(t.optimizer),
        bf16=bf16,
        fp16=fp16,
        use_cpu=not cuda,
        gradient_checkpointing=t.gradient_checkpointing and not fsdp,  # FSDP checkpoints its own units
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing and not fsdp else None,
        max_length=t.max_length,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a NaN/Inf step shows in the logged loss (the watchdog reads it)
        eval_strategy="steps" if has_eval else "no",
        eval_steps=(t.eval_steps or DEFAULT_EVAL_EVERY) if has_eval else None,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=1,  # storage keeps keepCheckpoints; the pod's disk keeps one
        report_to=["wandb"] if wandb else "none",
        dataloader_num_workers=0,
        disable_tqdm=False,
        ddp_find_unused_parameters=False if ranks > 1 else None,
        **(fsdp_args(t) if fsdp else {}),
        **method_args,
    )


def fsdp_args(t: api.Training) -> dict[str, Any]:
    """SFTConfig's FSDP settings for a QLoRA run: FSDP2, every decoder layer a unit (the model's
    ``_no_split_modules``), parameters resharded after the forward pass, the checkpoint read by
    rank 0 only and broadcast, a full (gathered) state dict when saving, so checkpoints and the
    adapter are the same files as with one rank, and FSDP's own activation checkpointing for
    training.gradientCheckpointing (the Trainer's would all-gather twice). transformers adds the
    QLoRA part itself: the LoRA layers wrapped on their own and FSDP's mixed precision set to the
    4-bit storage dtype."""
    return {"fsdp": True,
            "fsdp_config": {"version": 2, "reshard_after_forward": True, "cpu_ram_efficient_loading": True,
                            "state_dict_type": "FULL_STATE_DICT", "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                            "activation_checkpointing": t.gradient_checkpointing}}


def adapter_in_float32(model: Any) -> None:
    """The trainable (LoRA) weights are float32 on every device: TRL casts a quantized model's LoRA
    weights to bf16, where small updates at QLoRA's learning rates round away; fp16 mixed precision's
    loss scaler refuses fp16 weights outright; and CPUs have no fast bf16. The forward pass still
    computes in the compute dtype under autocast; the adapter costs a few MB more (docs/trainer.md)."""
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.to(torch.float32)


def kto_order(dataset: Any, seed: int, batch_size: int, kl: bool) -> Any:
    """KTO's training rows: shuffled once with the seed (KTOTrainer reads them in order, and
    feedback data often comes sorted by label, or unpaired as all chosen then all rejected), then, for
    the KL term, each row's mismatched completion: the previous row's in its batch, as
    ``KTOTrainer._prepare_dataset`` rotates them."""
    dataset = dataset.shuffle(seed=seed).flatten_indices()
    if not kl:
        return dataset

    def rotate(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return {"KL_completion_ids": [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]}

    return dataset.map(rotate, batched=True, batch_size=batch_size)


def orpo_rows(dataset: Any, max_length: int) -> Any:
    """The prepared pairs (``prompt_ids``, ``chosen_ids``, ``rejected_ids``: DPO's tokenization) in
    ORPOTrainer's layout: each answer after its prompt, cut at ``max_length`` (the start kept, as
    ORPO and DPO cut), ``*_labels`` -100 on the prompt, and the prompt alone (for generation)."""
    def rows(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"prompt_input_ids": batch["prompt_ids"],
                                     "prompt_attention_mask": [[1] * len(p) for p in batch["prompt_ids"]]}
        for name in ("chosen", "rejected"):
            ids = [(p + a)[:max_length] for p, a in zip(batch["prompt_ids"], batch[f"{name}_ids"], strict=True)]
            out[f"{name}_input_ids"] = ids
            out[f"{name}_attention_mask"] = [[1] * len(i) for i in ids]
            out[f"{name}_labels"] = [[-100] * min(len(p), len(i)) + i[len(p):]
                                     for p, i in zip(batch["prompt_ids"], ids, strict=True)]
        return out

    return dataset.map(rows, batched=True, remove_columns=dataset.column_names)


def trainer_class(method: str = "sft") -> Any:
    """TRL's SFTTrainer (DPOTrainer, ORPOTrainer, KTOTrainer for methods dpo, orpo, kto), with an
    evaluation that a SIGTERM can cut short (the checkpoint that follows must fit the pod's grace
    period; :class:`checkpoints.PreemptionHandler`). DPO, ORPO and KTO take the prepared data (prompt_ids
    and the answers' ids: :func:`data.tokenize`, the same tokenization): no second one in the GPU
    pod. ORPO (``trl.experimental``) tokenizes in its constructor: it gets :func:`orpo_rows`, which
    its tokenization leaves as they are."""
    from trl import DPOTrainer, KTOTrainer, SFTTrainer

    base = {"dpo": DPOTrainer, "kto": KTOTrainer}.get(method, SFTTrainer)
    if method == "orpo":
        from trl.experimental.orpo import ORPOTrainer

        base = ORPOTrainer

    class Trainer(base):  # type: ignore[misc,valid-type]
        if method == "orpo":
            def __init__(self, *args: Any, train_dataset: Any = None, eval_dataset: Any = None, **kwargs: Any) -> None:
                length = kwargs["args"].max_length
                super().__init__(*args, train_dataset=orpo_rows(train_dataset, length), **kwargs,
                                 eval_dataset=None if eval_dataset is None else orpo_rows(eval_dataset, length))

            def tokenize_row(self, feature: dict[str, Any], model: Any = None) -> dict[str, Any]:
                return {}  # orpo_rows made them: nothing to add

        def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
            try:
                return super().evaluate(*args, **kwargs)  # type: ignore[no-any-return]
            except checkpoints.EvalInterrupted as err:
                log.warning("%s: evaluation abandoned, saving a checkpoint", err)
                return {}

        def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
            if method == "sft" or "prompt_ids" not in dataset.column_names:
                return super()._prepare_dataset(dataset, *args, **kwargs)
            if method == "kto":  # prepared (checked: no prompt fills maxLength), then what KTOTrainer adds
                config = args[1]  # (processing_class, args, name): called before Trainer sets self.args
                return kto_order(dataset, config.seed, config.per_device_train_batch_size, self.calculate_KL)
            return dataset  # dpo: prepared and checked

    return Trainer


def use_best_adapter(model: Any, store: Store, out: str, step: int, work: Path) -> None:
    """training.keepBest: load the adapter weights of the best evaluation's checkpoint (kept in
    storage, checked against its sha256) into the model, so that adapter is the one published."""
    pointer = checkpoints.folder_pointer(store, out, step)
    local = checkpoints.fetch(store, pointer, work / "best") if pointer else None
    if local is None:
        raise StorageError(f"the best checkpoint (step {step}) is missing or damaged in {out}: cannot publish it")
    load_adapter_weights(model, local)
    log.info("publishing the adapter of the best evaluation: step %d (training.keepBest)", step)


def load_adapter_weights(model: Any, checkpoint: Path) -> None:
    """The LoRA weights of a Trainer checkpoint folder into the (PEFT) model."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(checkpoint / "adapter_model.safetensors")))


def finished_checkpoint(folder: Path) -> bool:
    """Whether a checkpoint was saved at the run's last step (its trainer state says so)."""
    state = json.loads((folder / "trainer_state.json").read_text())
    return bool(state.get("max_steps")) and int(state.get("global_step", 0)) >= int(state["max_steps"])


def restore_finished(trainer: Any, folder: Path, progress: Any) -> dict[str, Any]:
    """Load a finished run's adapter weights and trainer state from its last checkpoint (no step is
    trained) and replay its logged progress; returns no train() metrics (they would be this pod's)."""
    from transformers import TrainerState

    load_adapter_weights(trainer.model, folder)
    trainer.state = TrainerState.load_from_json(str(folder / "trainer_state.json"))
    for entry in trainer.state.log_history:
        progress.on_log(None, trainer.state, None, logs=entry)
    progress.on_train_end(None, trainer.state, None)
    log.info("the checkpoint of step %d is the run's last step: publishing it without training",
             trainer.state.global_step)
    return {}


def evaluated_at(log_history: list[dict[str, Any]], step: int) -> bool:
    return any("eval_loss" in h and h.get("step") == step for h in log_history)


def name_the_base(adapter_dir: Path, model: api.ModelSource) -> None:
    """PEFT records the folder the base was loaded from (for ``model.uri``, a path inside the pod):
    write the real base instead, as ``from_pretrained`` and the Hub expect (name, or the s3:// uri)."""
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = model.name or model.uri
    if model.name and model.revision:
        config["revision"] = model.revision
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def publish_adapter(store: Store, local: Path, out: str, spec: api.FineTuneJobSpec,
                    stamp: dict[str, Any] | None = None) -> dict[str, str]:
    """Upload the adapter folder and its own manifest (what a MergeJob checks); returns the files
    for the run manifest, keyed under ``adapter/``."""
    adapter_uri = join(out, contract.ADAPTER_DIR)
    adapter_files = store.upload_dir(local, adapter_uri)
    write_manifest(store, adapter_uri, adapter_files, kind="adapter", spec=spec.to_wire(),
                   baseModel=spec.model.to_wire(), **(stamp or {}))
    files = {f"{contract.ADAPTER_DIR}/{rel}": sha for rel, sha in adapter_files.items()}
    stored = store.get_text(join(adapter_uri, contract.MANIFEST)) or ""
    files[f"{contract.ADAPTER_DIR}/{contract.MANIFEST}"] = hashlib.sha256(stored.encode()).hexdigest()
    return files


# ----------------------------------------------------------------------------------------------
# Weights & Biases
# ----------------------------------------------------------------------------------------------


def setup_wandb(tracking: api.Tracking | None, ctx: PodContext, work: Path) -> bool:
    """Configure W&B through its environment variables; the run id is stable across pod retries,
    so a resumed job continues the same run. Returns whether W&B reports."""
    cfg = tracking.wandb if tracking else None
    if cfg is None or cfg.mode == "disabled":
        return False
    os.environ["WANDB_PROJECT"] = cfg.project
    os.environ["WANDB_MODE"] = cfg.mode
    os.environ["WANDB_DIR"] = str(work)
    os.environ.setdefault("WANDB_SILENT", "true")
    if cfg.entity:
        os.environ["WANDB_ENTITY"] = cfg.entity
    if cfg.host:
        os.environ["WANDB_BASE_URL"] = cfg.host
    uid = os.environ.get(contract.ENV_UID)
    if uid:
        os.environ["WANDB_RUN_ID"] = f"{ctx.name or 'run'}-{uid[:8]}"
        os.environ["WANDB_RESUME"] = "allow"
    (work / "wandb").mkdir(parents=True, exist_ok=True)
    return True


def finish_wandb(store: Store, work: Path, out: str) -> str | None:
    """Close the run; its URL online, or where its offline folder is stored."""
    import wandb

    run = wandb.run
    offline = os.environ.get("WANDB_MODE") == "offline"
    url = None if run is None or offline else run.url
    if run is not None:
        run.finish()
    if offline or url is None:
        return join(out, "wandb") if (work / "wandb").is_dir() else None
    return url
