"""Every way a merge can go wrong ends in a clear, named error, and nothing is published as complete."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kubetune_trainer import merge as merge_recipe
from kubetune_trainer import merge_lora, storage
from kubetune_trainer.runtime import InvalidAdapter, InvalidSpec, StorageError, VerificationFailed
from merge_helpers import BUCKET, Adapter, build_adapter, publish_adapter, store_for

from kubetune import api

pytestmark = pytest.mark.integration


def assert_unpublished(server: Any, out_uri: str) -> None:
    assert storage.read_manifest(store_for(server), out_uri) is None, "a failed merge wrote manifest.json"


def test_adapter_without_manifest_is_refused(
    s3: Any, s3_env: dict[str, str], tiny_adapter: Adapter, merge_spec: Any, pod: Any, out_uri: str,
) -> None:
    """A run that never finished has adapter files but no manifest.json."""
    uri = publish_adapter(s3, tiny_adapter.local, f"s3://{BUCKET}/runs/unfinished/adapter",
                          {"uri": tiny_adapter.base_uri}, manifest=False)
    with pytest.raises(InvalidAdapter, match=r"unfinished/adapter/manifest\.json is missing: the adapter is "
                                             r"incomplete"):
        merge_recipe.merge(merge_spec(uri, out_uri), pod)
    assert store_for(s3).list(out_uri) == []


def test_base_model_other_than_the_trained_one_is_refused(
    s3: Any, s3_env: dict[str, str], tiny_adapter: Adapter, merge_spec: Any, pod: Any, out_uri: str,
) -> None:
    spec = merge_spec(tiny_adapter.uri, out_uri, source={"baseModel": {"name": "meta-llama/Llama-3.2-1B"}})
    with pytest.raises(InvalidAdapter, match=r"was trained on s3://merge-tests/bases/tiny, not on source\.baseModel "
                                             r"meta-llama/Llama-3\.2-1B"):
        merge_recipe.merge(spec, pod)
    assert_unpublished(s3, out_uri)


def test_base_whose_shapes_do_not_fit_the_adapter_is_refused(
    s3: Any, s3_env: dict[str, str], tiny_adapter: Adapter, merge_spec: Any, pod: Any, out_uri: str,
    tmp_path: Path,
) -> None:
    """The manifest names a base folder that now holds another model (hidden 32, not 64)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    other = tmp_path / "other-base"
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_adapter.base_dir).save_pretrained(other)
    base_uri = s3.upload_dir(other, BUCKET, "bases/replaced")
    uri = publish_adapter(s3, tiny_adapter.local, f"s3://{BUCKET}/runs/replaced/adapter", {"uri": base_uri})
    with pytest.raises(InvalidAdapter, match=r"does not fit the base model s3://merge-tests/bases/replaced: .*size"):
        merge_recipe.merge(merge_spec(uri, out_uri), pod)
    assert_unpublished(s3, out_uri)


def test_adapter_file_changed_after_training_is_refused(
    s3: Any, s3_env: dict[str, str], tiny_adapter: Adapter, merge_spec: Any, pod: Any, out_uri: str,
) -> None:
    uri = publish_adapter(s3, tiny_adapter.local, f"s3://{BUCKET}/runs/tampered/adapter",
                          {"uri": tiny_adapter.base_uri})
    bucket, key = storage.split_s3(storage.join(uri, "adapter_config.json"))
    s3.client().put_object(Bucket=bucket, Key=key, Body=b'{"peft_type": "LORA"}')
    with pytest.raises(InvalidAdapter, match=r"differ from the checksums .*: adapter_config\.json"):
        merge_recipe.merge(merge_spec(uri, out_uri), pod)
    assert_unpublished(s3, out_uri)


def test_unwritable_output_fails_before_any_download(
    s3: Any, s3_env: dict[str, str], tiny_adapter: Adapter, merge_spec: Any, pod: Any,
) -> None:
    with pytest.raises(StorageError, match=r"cannot write s3://no-such-bucket/merged/\.kubetune-write-probe at "
                                           r"http://127\.0\.0\.1:\d+: the bucket does not exist"):
        merge_recipe.merge(merge_spec(tiny_adapter.uri, "s3://no-such-bucket/merged"), pod)
    assert not (pod.work_dir / "merge").exists()  # failed before downloading anything


def test_unresolved_finetunejob_ref_is_an_invalid_spec(merge_spec: Any, pod: Any) -> None:
    spec = api.MergeJobSpec.model_validate({"source": {"fineTuneJobRef": {"name": "run-1"}},
                                            "output": {"uri": f"s3://{BUCKET}/x"}})
    with pytest.raises(InvalidSpec, match=r"fineTuneJobRef 'run-1' was not resolved"):
        merge_recipe.merge(spec, pod)


def test_s3_stopped_mid_upload_leaves_no_manifest(
    s3_factory: Any, tiny_adapter: Adapter, pod: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server goes away after the first merged file is stored: the merge fails with a
    StorageError, and once the server is back the output has files but no manifest.json."""
    server = s3_factory()
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    server.make_bucket(BUCKET)
    base_uri = server.upload_dir(tiny_adapter.base_dir, BUCKET, "bases/tiny")
    uri = publish_adapter(server, tiny_adapter.local, f"s3://{BUCKET}/runs/tiny/adapter", {"uri": base_uri})
    out_uri = f"s3://{BUCKET}/merged/cut"
    spec = api.MergeJobSpec.model_validate({"source": {"adapterUri": uri}, "dtype": "float32",
                                            "output": {"uri": out_uri}, "storage": {"endpoint": server.endpoint}})

    upload_file = storage.Store.upload_file
    stored: list[str] = []

    def upload_then_cut(self: storage.Store, path: Path, target: str) -> str:
        digest = upload_file(self, path, target)
        if target.startswith(out_uri) and not stored:
            stored.append(target)
            server.stop()  # the network goes away mid-upload
        return digest

    monkeypatch.setattr(storage.Store, "upload_file", upload_then_cut)
    with pytest.raises(StorageError, match=rf"cannot upload to {out_uri}/\S+ at {server.endpoint}"):
        merge_recipe.merge(spec, pod, max_shard_size="4MB")  # several shards: several uploads
    server.start()
    assert stored, "the upload never started"
    assert set(store_for(server).list(out_uri)) >= {stored[0][len(out_uri) + 1:]}
    assert_unpublished(server, out_uri)


def test_broken_merge_is_caught_by_verification(
    s3: Any, s3_env: dict[str, str], tied_base_dir: Path, tied_base_uri: str, merge_spec: Any, pod: Any,
    out_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without the untie step, merging a LoRA on a tied embedding also changes lm_head: a really
    wrong model, which the logit check must refuse to publish."""
    local = build_adapter(tied_base_dir, tmp_path / "adapter", seed=3, target_modules=["embed_tokens", "q_proj"])
    uri = publish_adapter(s3, local, f"s3://{BUCKET}/runs/broken/adapter", {"uri": tied_base_uri})
    monkeypatch.setattr(merge_lora, "untie_adapted_embeddings", lambda model: None)
    with pytest.raises(VerificationFailed, match=r"the saved merged model \(reloaded\) differs from base\+adapter "
                                                 r"by [0-9.e+-]+ in the logits \(tolerance 0\.000[0-9]+\): nothing "
                                                 r"was published"):
        merge_recipe.merge(merge_spec(uri, out_uri), pod)
    assert store_for(s3).list(out_uri) == []


def test_merge_that_misses_a_layer_is_caught_by_verification(
    s3: Any, s3_env: dict[str, str], tiny_adapter: Adapter, merge_spec: Any, pod: Any, out_uri: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The check compares the published model with base+adapter computed unmerged, not with the
    merge's own arithmetic: a merge that forgets one layer's update is refused."""
    import torch

    merge = merge_lora.merge

    def forget_one(peft_model: Any) -> Any:
        with torch.no_grad():
            next(p for n, p in peft_model.named_parameters() if "lora_B" in n).zero_()
        return merge(peft_model)

    monkeypatch.setattr(merge_lora, "merge", forget_one)
    with pytest.raises(VerificationFailed, match=r"the saved merged model \(reloaded\) differs from base\+adapter"):
        merge_recipe.merge(merge_spec(tiny_adapter.uri, out_uri), pod)
    assert store_for(s3).list(out_uri) == []


def test_tolerance_override_is_applied(
    s3: Any, s3_env: dict[str, str], tiny_adapter: Adapter, merge_spec: Any, pod: Any, out_uri: str,
) -> None:
    """bfloat16 rounding always leaves some difference: a tolerance below it fails the merge."""
    spec = merge_spec(tiny_adapter.uri, out_uri, dtype="bfloat16", verify={"tolerance": 1e-9})
    with pytest.raises(VerificationFailed, match=r"\(tolerance 1e-09\)"):
        merge_recipe.merge(spec, pod)
    assert_unpublished(s3, out_uri)
