"""Run in a fresh process by the merge tests: load a merged model folder with plain transformers.

    python reload_logits.py MODEL_DIR DTYPE OUT.pt '["probe 1", "probe 2"]'

Saves the logits of each probe to OUT.pt (weights as stored in DTYPE, float32 arithmetic), and fails
if loading pulled in PEFT (a merged model must not need it), if the folder still holds adapter files,
or if the weights are not stored in DTYPE.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(model_dir: str, dtype: str, out: str, probes: str) -> None:
    folder = Path(model_dir)
    assert not (folder / "adapter_config.json").exists(), "the merged model still holds adapter_config.json"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    assert "peft" not in sys.modules, "loading the merged model imported peft"
    stored = {str(d).removeprefix("torch.") for d in _safetensors_dtypes(folder)}
    assert stored == {dtype}, f"weights stored as {stored}, not {dtype}"
    model = model.float()  # exact upcast: float32 arithmetic on the published weights
    with torch.no_grad():
        logits = [model(**tokenizer(p, return_tensors="pt")).logits[0].float() for p in json.loads(probes)]
    torch.save(logits, out)


def _safetensors_dtypes(folder: Path) -> set[torch.dtype]:
    from safetensors import safe_open

    dtypes = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as fh:
            dtypes.update(fh.get_tensor(key).dtype for key in fh.keys())
    return dtypes


if __name__ == "__main__":
    main(*sys.argv[1:])
