"""Model and tokenizer loading from a ``spec.model`` source, shared by the train and merge recipes.

* :func:`resolve_model` turns ``model.uri`` (an ``s3://`` folder written by ``save_pretrained``)
  into a local folder (parallel download, retried), or returns ``model.name`` as is (a hub id,
  honouring ``HF_HUB_OFFLINE``/``HF_ENDPOINT``/``HF_TOKEN``, or a local path).
  ``tokenizer_only=True`` fetches just the small tokenizer/config files, so data can be checked
  against the tokenizer before gigabytes of weights move.
* :func:`load_tokenizer` sets a pad token when the model has none (and says which).
* :func:`quantization_config` / :func:`lora_config` map the spec onto bitsandbytes / peft.
* :func:`load_model` loads the base (4-bit NF4 by default) ready for k-bit training.
* :func:`load_unquantized` loads a model in a plain dtype (the merge recipe's base and its reload).

Heavy libraries (torch, transformers, peft) are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubetune import api, contract
from kubetune_trainer.runtime import InvalidSpec, NotFound
from kubetune_trainer.storage import Store, join

log = logging.getLogger("kubetune.modeling")

# Everything AutoTokenizer/AutoConfig may read; never the weights.
TOKENIZER_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "tokenizer.model", "*.tiktoken", "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
    "additional_chat_templates/*",
)


def is_tokenizer_file(rel: str) -> bool:
    """Whether a file of a model folder is needed to load only the tokenizer and config."""
    return any(fnmatch.fnmatch(rel, pattern) for pattern in TOKENIZER_FILES)


def download_model(store: Store, uri: str, dest: Path, tokenizer_only: bool = False) -> Path:
    """Download an s3:// model folder into ``dest`` (parallel, retried by boto3). Files already
    there are kept, so the full download after a tokenizer-first one fetches only the rest.

    A folder (or bucket) that does not exist is the spec's mistake, not a storage fault: InvalidSpec,
    which fails the job at once instead of retrying it on GPUs (a failing storage is a StorageError)."""
    try:
        rels = store.list(uri)
    except NotFound as err:
        raise InvalidSpec(f"spec.model.uri {uri}: {err}") from err
    if not rels:
        raise InvalidSpec(f"spec.model.uri {uri}: the model folder is empty or does not exist")
    if tokenizer_only:
        rels = [r for r in rels if is_tokenizer_file(r)]
    dest.mkdir(parents=True, exist_ok=True)
    todo = [r for r in rels if not (dest / r).is_file()]
    with ThreadPoolExecutor(store.workers) as pool:
        list(pool.map(lambda r: store.download_file(join(uri, r), dest / r), todo))
    log.info("model %s: %d files in %s (%d downloaded)", uri, len(rels), dest, len(todo))
    return dest


def resolve_adapter(source: api.ModelSource, store: Store, work_dir: Path) -> Path | None:
    """model.adapterFrom as a local PEFT adapter folder (None when unset). The operator turns a
    fineTuneJobRef into that job's adapter uri before the pod starts; a folder that does not exist,
    or holds no adapter_config.json, is InvalidSpec."""
    ref = source.adapter_from
    if ref is None:
        return None
    if ref.uri is None:
        raise InvalidSpec("model.adapterFrom.fineTuneJobRef is resolved by the operator into the job's adapter; "
                          "outside a cluster set model.adapterFrom.uri")
    dest = work_dir / "adapter-from"
    try:
        rels = store.list(ref.uri)
    except NotFound as err:
        raise InvalidSpec(f"model.adapterFrom.uri {ref.uri}: {err}") from err
    if "adapter_config.json" not in rels:
        raise InvalidSpec(f"model.adapterFrom.uri {ref.uri} holds no PEFT adapter (no adapter_config.json)")
    dest.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(store.workers) as pool:
        list(pool.map(lambda r: store.download_file(join(ref.uri, r), dest / r), rels))
    return dest


def continue_adapter(model: Any, adapter: Path) -> Any:
    """The base with model.adapterFrom's adapter, trainable: the run continues it (for DPO, TRL keeps a
    frozen copy of it as the reference, on the same base)."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise InvalidSpec(f"model.adapterFrom: the adapter does not fit this base: {err}") from err


def resolve_model(source: api.ModelSource, store: Store, work_dir: Path, tokenizer_only: bool = False,
                  cache: Path | None = None) -> str:
    """A name or local path that ``from_pretrained`` accepts for this model source. ``cache``
    (spec.modelCache, mounted; default ``$KUBETUNE_MODEL_CACHE``): an s3:// model is read from there
    when a pod stored it before, else downloaded into it (:func:`cached_model`)."""
    if cache is None and os.environ.get(contract.ENV_MODEL_CACHE):
        cache = Path(os.environ[contract.ENV_MODEL_CACHE])
    if source.uri:
        if cache is not None:
            return str(cached_model(store, source.uri, cache, work_dir, tokenizer_only))
        return str(download_model(store, source.uri, work_dir / "model", tokenizer_only=tokenizer_only))
    assert source.name is not None
    return source.name


COMPLETE = ".kubetune-complete"  # written last into a cached model folder (its files and digest)


def cached_model(store: Store, uri: str, cache: Path, work_dir: Path, tokenizer_only: bool = False) -> Path:
    """The model folder for ``uri`` in the shared cache, keyed by the content of its objects (ETags
    and sizes, :func:`kubetune_trainer.fingerprint.content_digest`), so a changed model is another
    entry and an unchanged one is never fetched twice.

    Safe under concurrent pods: a download goes to a temporary folder next to the entry and is
    renamed into place whole (an atomic rename on one filesystem); a pod that loses the race
    removes its copy and uses the winner's. Only complete entries (with :data:`COMPLETE`) are read.
    ``tokenizer_only`` with no cached entry yet fetches just the tokenizer files into the pod's work
    dir, as without a cache (bad data still fails before any weights move)."""
    import shutil
    import uuid

    from kubetune_trainer.fingerprint import content_digest

    try:
        digest = content_digest(uri, store)
    except NotFound as err:
        raise InvalidSpec(f"spec.model.uri {uri}: {err}") from err
    if digest is None:
        raise InvalidSpec(f"spec.model.uri {uri}: the model folder is empty or does not exist")
    entry = cache / "models" / digest
    if (entry / COMPLETE).is_file():
        log.info("model %s: from the model cache (%s)", uri, entry)
        return entry
    if tokenizer_only:
        return download_model(store, uri, work_dir / "model", tokenizer_only=True)
    partial = cache / "models" / f".partial-{digest[:16]}-{uuid.uuid4().hex[:8]}"
    download_model(store, uri, partial)
    (partial / COMPLETE).write_text(json.dumps({"uri": uri, "digest": digest}) + "\n")
    try:
        partial.rename(entry)
    except OSError:  # another pod renamed its complete copy into place first
        shutil.rmtree(partial, ignore_errors=True)
        if not (entry / COMPLETE).is_file():
            raise
        log.info("model %s: another pod cached it first; using %s", uri, entry)
        return entry
    log.info("model %s: stored in the model cache (%s)", uri, entry)
    return entry


def hub_kwargs(source: api.ModelSource) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments common to the tokenizer and the model."""
    kwargs: dict[str, Any] = {"trust_remote_code": source.trust_remote_code}
    if source.name and source.revision:
        kwargs["revision"] = source.revision
    token = os.environ.get(contract.ENV_HF_TOKEN)
    if source.name and token:
        kwargs["token"] = token
    return kwargs


def load_tokenizer(path: str, source: api.ModelSource, pad: bool = True) -> Any:
    """Load the tokenizer; when it has no pad token, use eos (or unk) and log the choice (unless
    ``pad=False``: the merge publishes the tokenizer as it was)."""
    from transformers import AutoTokenizer

    with unloadable(source):
        tokenizer = AutoTokenizer.from_pretrained(path, **hub_kwargs(source))
    if pad and tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
            log.warning("the tokenizer has no pad, eos or unk token: added <|pad|>")
        else:
            tokenizer.pad_token = fallback
            log.info("the tokenizer has no pad token: using %r", fallback)
    return tokenizer


@contextlib.contextmanager
def unloadable(source: api.ModelSource) -> Iterator[None]:
    """A model folder transformers cannot load (no config, a broken tokenizer, weights that do not
    match the config) is the spec's input: InvalidSpec, permanent. An operating-system error (a full
    disk: it has an errno) stays what it is."""
    try:
        yield
    except (OSError, ValueError) as err:
        if isinstance(err, OSError) and err.errno is not None:
            raise
        raise InvalidSpec(f"cannot load the model {source.display()}: {err}") from err


def use_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def bf16_supported() -> bool:
    """Native bf16 only: a GPU of compute capability 8 or more (Ampere and later). torch's own
    ``is_bf16_supported()`` also counts emulation (T4, V100), where bf16 is slow; CPUs emulate it too."""
    import torch

    return mixed_precision(True, torch.cuda.is_available(),
                           torch.cuda.get_device_capability() if torch.cuda.is_available() else None)[0]


def mixed_precision(wanted: bool, cuda: bool, capability: tuple[int, int] | None) -> tuple[bool, bool]:
    """(bf16, fp16) for ``training.bf16``: bf16 where the GPU has it natively (capability >= 8), else
    fp16 with the Trainer's loss scaler on an older GPU; neither on CPU (float32)."""
    if not wanted or not cuda or capability is None:
        return False, False
    native = capability[0] >= 8
    return native, not native


def compute_dtype(quant: api.Quantization) -> Any:
    """The dtype the base computes in: the spec's on a GPU, float32 on CPU (no fast bf16/fp16 there)."""
    import torch

    wanted = getattr(torch, quant.compute_dtype)
    if not use_cuda() and wanted != torch.float32:
        log.info("no GPU: computing in float32 instead of %s", quant.compute_dtype)
        return torch.float32
    if wanted == torch.bfloat16 and not bf16_supported():
        log.info("this GPU has no bfloat16: computing in float16")
        return torch.float16
    return wanted


def quantization_config(quant: api.Quantization, fsdp: bool = False) -> Any | None:
    """BitsAndBytesConfig for 4/8-bit; None for bits 16 (plain LoRA). ``fsdp``: the packed 4-bit
    weights are stored in the compute dtype, so FSDP can shard them like any other weight (the
    FSDP-QLoRA recipe; bitsandbytes still computes in 4-bit)."""
    from transformers import BitsAndBytesConfig

    if quant.bits == 16:
        return None
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    dtype = compute_dtype(quant)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=dtype,
        **({"bnb_4bit_quant_storage": dtype} if fsdp else {}),
    )


def lora_config(lora: api.Lora) -> Any:
    """peft LoraConfig from spec.lora (``[all-linear]`` becomes peft's ``"all-linear"`` shortcut)."""
    from peft import LoraConfig

    targets: str | list[str] = "all-linear" if lora.target_modules == ["all-linear"] else list(lora.target_modules)
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias=lora.bias,
        target_modules=targets,
        use_rslora=lora.use_rslora,
        modules_to_save=lora.modules_to_save,
        task_type="CAUSAL_LM",
    )


def varlen_kernel() -> bool:
    """Whether this image has a varlen attention kernel (flash-attn), used on GPUs."""
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def attention_implementation() -> str:
    """``flash_attention_2`` when a GPU and the flash-attn package are there: with TRL's padding-free
    bfd batches it runs varlen (``cu_seq_lens``), each sample attending only to itself, no mask.
    Else ``sdpa`` (see :func:`kubetune_trainer.sft.micro_batching` for what bfd needs then)."""
    if use_cuda() and varlen_kernel():
        return "flash_attention_2"
    return "sdpa"


def load_model(path: str, source: api.ModelSource, quant: api.Quantization, gradient_checkpointing: bool,
               device: int = 0, fsdp: bool = False) -> Any:
    """The frozen base: bitsandbytes 4/8-bit (QLoRA) or unquantized (bits 16), ready for k-bit training.
    ``device``: the GPU of this rank (its local rank under torchrun); on CPU every rank uses the CPU.
    ``fsdp``: loaded for FSDP to shard (4-bit storage in the compute dtype, no device map, no
    float32 up-cast of the other weights: an FSDP unit needs one dtype; activation checkpointing is
    FSDP's own)."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    dtype = compute_dtype(quant)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attention_implementation(), **hub_kwargs(source)}
    bnb = quantization_config(quant, fsdp=fsdp)
    if bnb is not None:
        kwargs["quantization_config"] = bnb
        if not fsdp:
            kwargs["device_map"] = {"": device} if use_cuda() else {"": "cpu"}
    with unloadable(source):
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if bnb is not None and not fsdp:  # with FSDP, its own activation checkpointing (sft.fsdp_args)
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    log.info("loaded %s (%s, %d-bit, %s attention)", source.display(), dtype, quant.bits,
             model.config._attn_implementation)
    return model


def load_unquantized(path: str, source: api.ModelSource, dtype: str) -> Any:
    """A causal LM in ``dtype``, never quantized (what the merge recipe merges into and reloads), on the
    GPU(s) when there are any. A model that cannot be loaded, or is saved quantized, is an InvalidSpec."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = hub_kwargs(source)
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise InvalidSpec(f"cannot load the base model {source.display()}: {err}") from err
    if getattr(config, "quantization_config", None):
        raise InvalidSpec(f"the base model {source.display()} is saved quantized; merge into the full-precision "
                          "model")
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, dtype), low_cpu_mem_usage=True,
            device_map="auto" if use_cuda() else None, **kwargs,
        ).eval()
    except (OSError, ValueError) as err:
        raise InvalidSpec(f"cannot load the base model {source.display()}: {err}") from err


def four_bit_bytes(path: str, source: api.ModelSource) -> int:
    """About what the base's weights take in 4-bit (NF4 linear layers at half a byte a weight, the
    embeddings and output head in 16-bit), from its config alone (no weights are read)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, **hub_kwargs(source))
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=source.trust_remote_code)
    total = sum(p.numel() for p in model.parameters())
    embeddings = sum(m.weight.numel() for m in (model.get_input_embeddings(), model.get_output_embeddings())
                     if m is not None and m.weight is not None)
    return int((total - embeddings) * 0.5 + embeddings * 2)


def distributed_strategy(wanted: str, ranks: int, path: str, source: api.ModelSource, device: int = 0) -> str | None:
    """training.distributed for this run: None with one rank; ``auto`` is fsdp on GPUs where the 4-bit
    base takes more than half a GPU's memory (what is left cannot hold activations, optimizer and
    the CUDA context), else ddp."""
    if ranks < 2:
        return None
    if wanted == "fsdp" and not use_cuda():
        raise InvalidSpec("training.distributed fsdp needs GPUs (FSDP shards the model over CUDA devices); "
                          "on CPU use ddp or auto")
    if wanted != "auto":
        return wanted
    if not use_cuda():
        return "ddp"
    import torch

    need, have = four_bit_bytes(path, source), torch.cuda.get_device_properties(device).total_memory
    choice = "fsdp" if need > have / 2 else "ddp"
    log.info("training.distributed auto: %s (the 4-bit base needs ~%.1f GiB of a %.1f GiB GPU)", choice,
             need / 2**30, have / 2**30)
    return choice
