"""A real small pretrained model: SmolLM2-135M-Instruct with an all-linear LoRA, merged in bfloat16."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kubetune_trainer import merge as merge_recipe
from merge_helpers import BUCKET, Adapter, assert_published, build_adapter, max_diff, publish_adapter, reference_logits

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_smollm2_adapter_merged_in_bfloat16(
    s3: Any, s3_env: dict[str, str], bucket: str, smollm2_dir: Path, merge_spec: Any, pod: Any, out_uri: str,
    download: Any, fresh_logits: Any, tmp_path: Path,
) -> None:
    base_uri = s3.upload_dir(smollm2_dir, BUCKET, "bases/smollm2-135m-instruct")
    local = build_adapter(smollm2_dir, tmp_path / "adapter", std=0.01, r=16, lora_alpha=32)
    uri = publish_adapter(s3, local, f"s3://{BUCKET}/runs/smollm2/adapter", {"uri": base_uri},
                          lora={"r": 16, "alpha": 32})
    adapter = Adapter(uri, local, smollm2_dir, base_uri)
    spec = merge_spec(uri, out_uri, dtype="bfloat16",
                      verify={"prompts": ["What is the capital of France?"], "maxNewTokens": 12})

    result = merge_recipe.merge(spec, pod)

    merged_dir = download(out_uri)
    manifest = assert_published(s3, out_uri, merged_dir, result)
    sample = result["samples"][0]
    assert sample["prompt"] == "What is the capital of France?" and sample["output"].strip()
    print(f"\nsample: {sample}\nverification: {manifest['verification']}\n"
          f"details: {manifest['verificationDetails']}\ntimings: {manifest['timings']}")

    merged = fresh_logits(merged_dir, "bfloat16")
    with_adapter = reference_logits(adapter.base_dir, adapter.local, "bfloat16")
    base_only = reference_logits(adapter.base_dir, None, "bfloat16")
    tolerance = result["verification"]["tolerance"]
    assert max_diff(merged, with_adapter) <= tolerance
    assert max_diff(merged, base_only) > 2 * max_diff(merged, with_adapter)
