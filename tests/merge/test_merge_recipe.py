"""The MergeJob recipe end to end on CPU: real PEFT adapters, real transformers, a real S3 server.

Every merged model is reloaded with plain ``AutoModelForCausalLM.from_pretrained`` in a fresh
process and compared with base+adapter computed through PEFT (unmerged) in this process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kubetune_trainer import merge as merge_recipe
from kubetune_trainer import storage
from merge_helpers import (
    BUCKET,
    TRAINING_FINGERPRINT,
    Adapter,
    assert_matches_base_plus_adapter,
    assert_published,
    build_adapter,
    max_diff,
    publish_adapter,
    reference_logits,
    store_for,
)

from kubetune import contract

pytestmark = pytest.mark.integration


def test_merge_bfloat16_publishes_a_standalone_model_matching_base_plus_adapter(
    s3: Any, s3_env: dict[str, str], tiny_adapter: Adapter, merge_spec: Any, pod: Any, out_uri: str,
    download: Any, fresh_logits: Any,
) -> None:
    """(float32 runs through the CLI in test_merge_cli.py, with the same checks.)"""
    result = merge_recipe.merge(merge_spec(tiny_adapter.uri, out_uri, dtype="bfloat16"), pod)

    local = download(out_uri)
    manifest = assert_published(s3, out_uri, local, result)
    assert manifest["dtype"] == "bfloat16" and manifest["mergeMethod"] == "peft"
    assert manifest["adapterUri"] == tiny_adapter.uri and result["adapterUri"] == tiny_adapter.uri
    assert manifest["baseModel"]["uri"] == tiny_adapter.base_uri  # taken from the adapter's manifest
    assert [s["prompt"] for s in result["samples"]] == ["What is a Kubernetes Job?"]
    assert manifest["samples"] == result["samples"]
    # the card says what the model was made from and how it was checked
    card = (local / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card
    for fact in (tiny_adapter.base_uri, tiny_adapter.uri, f"s3://{BUCKET}/data/train.jsonl", TRAINING_FINGERPRINT,
                 "| verification | passed"):
        assert fact in card, f"{fact!r} missing from the model card:\n{card}"
    assert_matches_base_plus_adapter(fresh_logits(local, "bfloat16"), tiny_adapter, "bfloat16", result)


def test_modules_to_save_lm_head_on_tied_embeddings(
    s3: Any, s3_env: dict[str, str], tied_base_dir: Path, tied_base_uri: str, merge_spec: Any, pod: Any,
    out_uri: str, download: Any, fresh_logits: Any, tmp_path: Path,
) -> None:
    """A trained copy of lm_head on a model whose lm_head is tied to embed_tokens: the merged model
    must keep the trained head AND the original embeddings (so it is saved untied)."""
    local_adapter = build_adapter(tied_base_dir, tmp_path / "adapter", seed=2,
                                  target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    uri = publish_adapter(s3, local_adapter, f"s3://{BUCKET}/runs/mts/adapter", {"uri": tied_base_uri})

    result = merge_recipe.merge(merge_spec(uri, out_uri), pod)

    local = download(out_uri)
    assert assert_published(s3, out_uri, local, result)["mergeMethod"] == "peft"
    merged = fresh_logits(local, "float32")
    reference = reference_logits(tied_base_dir, local_adapter, "float32")
    assert max_diff(merged, reference) <= 1e-4 * max(float(t.abs().max()) for t in reference)
    assert max_diff(merged, reference_logits(tied_base_dir, None, "float32")) > 0.1


def test_lora_on_tied_embedding_unties_lm_head(
    s3: Any, s3_env: dict[str, str], tied_base_dir: Path, tied_base_uri: str, merge_spec: Any, pod: Any,
    out_uri: str, download: Any, fresh_logits: Any, tmp_path: Path,
) -> None:
    """LoRA on embed_tokens of a tied model: merging in place would also change lm_head (the shared
    weight), which the unmerged model never did. The recipe unties first, so the logits match."""
    local_adapter = build_adapter(tied_base_dir, tmp_path / "adapter", seed=3,
                                  target_modules=["embed_tokens", "q_proj", "o_proj"])
    uri = publish_adapter(s3, local_adapter, f"s3://{BUCKET}/runs/tied-embed/adapter", {"uri": tied_base_uri})

    result = merge_recipe.merge(merge_spec(uri, out_uri), pod)

    local = download(out_uri)
    assert assert_published(s3, out_uri, local, result)["mergeMethod"] == "peft"
    merged = fresh_logits(local, "float32")
    reference = reference_logits(tied_base_dir, local_adapter, "float32")
    assert max_diff(merged, reference) <= 1e-4 * max(float(t.abs().max()) for t in reference)
    assert max_diff(merged, reference_logits(tied_base_dir, None, "float32")) > 0.1


def test_reruns_skip_a_published_merge_and_replace_another_source(
    s3: Any, s3_env: dict[str, str], tiny_adapter: Adapter, merge_spec: Any, pod: Any, out_uri: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """manifest.json is the last object written; a retried pod finds it and does no work; a merge of
    another source (here: another dtype) at the same output replaces it."""
    order: list[str] = []
    for method in ("upload_file", "put_text"):
        original = getattr(storage.Store, method)

        def record(self: storage.Store, *args: Any, _original: Any = original) -> Any:
            target = args[1] if isinstance(args[0], Path) else args[0]
            if target.startswith(out_uri) and ".kubetune-write-probe" not in target:
                order.append(target[len(out_uri) + 1:])
            return _original(self, *args)

        monkeypatch.setattr(storage.Store, method, record)
    spec = merge_spec(tiny_adapter.uri, out_uri)
    first = merge_recipe.merge(spec, pod)
    assert order[-1] == contract.MANIFEST and order.count(contract.MANIFEST) == 1 and "model.safetensors" in order
    bucket, key = storage.split_s3(storage.join(out_uri, contract.MANIFEST))
    etag = s3.client().head_object(Bucket=bucket, Key=key)["ETag"]

    assert merge_recipe.merge(spec, pod) == first
    assert s3.client().head_object(Bucket=bucket, Key=key)["ETag"] == etag  # manifest not rewritten
    assert not (pod.work_dir / "merge").exists()  # nothing downloaded

    result = merge_recipe.merge(merge_spec(tiny_adapter.uri, out_uri, dtype="bfloat16"), pod)
    manifest = storage.read_manifest(store_for(s3), out_uri)
    assert manifest is not None and manifest["dtype"] == "bfloat16"
    assert result["verification"] == manifest["verification"] != first["verification"]
