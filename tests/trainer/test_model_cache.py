"""spec.modelCache (issue #15, part 2): an s3:// base model is kept on a shared volume by content,
so retries, later jobs and MergeJobs read it instead of downloading it again; concurrent pods never
expose a partial copy; a changed model is a new entry. Against the real S3 server, with the
volume a local folder (in a pod: the PersistentVolumeClaim the operator mounts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from kubetune_trainer import modeling
from kubetune_trainer.runtime import InvalidSpec

from kubetune import api

pytestmark = pytest.mark.integration


def counting(store: Any) -> list[str]:
    """Record every object the store downloads (the store's own method, wrapped)."""
    fetched: list[str] = []
    original = store.download_file

    def download_file(uri: str, dest: Path) -> Any:
        fetched.append(uri)
        return original(uri, dest)

    store.download_file = download_file
    return fetched


def upload_model(s3: Any, prefix: str, model_dir: Path) -> str:
    bucket, _, key = f"{prefix}/model".partition("/")
    return s3.upload_dir(model_dir, bucket, key)


def test_a_model_is_downloaded_once_then_read_from_the_cache(tiny_model_dir: Path, s3: Any, store: Any,
                                                             prefix: str, tmp_path: Path) -> None:
    uri = upload_model(s3, prefix, tiny_model_dir)
    source, cache = api.ModelSource(uri=uri), tmp_path / "cache"
    fetched = counting(store)

    # no entry yet: the tokenizer files come first, into the pod's work dir (data checks before weights)
    tokenizer = modeling.resolve_model(source, store, tmp_path / "pod-1", tokenizer_only=True, cache=cache)
    assert Path(tokenizer).parent == tmp_path / "pod-1" and "model.safetensors" not in str(fetched)
    first = modeling.resolve_model(source, store, tmp_path / "pod-1", cache=cache)
    assert Path(first).parent == cache / "models" and (Path(first) / modeling.COMPLETE).is_file()
    assert any(f.endswith("model.safetensors") for f in fetched)
    assert not list((cache / "models").glob(".partial-*"))

    # the retry (a new pod, a new work dir): nothing is downloaded, not even the tokenizer
    fetched.clear()
    assert modeling.resolve_model(source, store, tmp_path / "pod-2", tokenizer_only=True, cache=cache) == first
    assert modeling.resolve_model(source, store, tmp_path / "pod-2", cache=cache) == first
    assert fetched == []
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(first)  # a whole, loadable model

    # the model changes in storage: another entry, the old one untouched
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    s3.client().put_object(Bucket=bucket, Key=f"{key}/generation_config.json", Body=b'{"do_sample": false}')
    second = modeling.resolve_model(source, store, tmp_path / "pod-3", cache=cache)
    assert second != first and (Path(first) / modeling.COMPLETE).is_file()
    assert (Path(second) / "generation_config.json").read_text() == '{"do_sample": false}'


def test_missing_model_is_invalid_spec_with_a_cache(store: Any, prefix: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidSpec, match="does not exist"):
        modeling.resolve_model(api.ModelSource(uri=f"s3://{prefix}/none"), store, tmp_path / "w", cache=tmp_path / "c")


RESOLVE = """
import json, sys
from pathlib import Path
from kubetune import api
from kubetune_trainer import modeling
from kubetune_trainer.storage import Store
store = Store.from_spec(api.Storage(endpoint=sys.argv[1]))
path = modeling.resolve_model(api.ModelSource(uri=sys.argv[2]), store, Path(sys.argv[3]), cache=Path(sys.argv[4]))
print(json.dumps({"path": path}))
"""


def test_pods_racing_for_one_model_never_see_a_partial_copy(tiny_model_dir: Path, s3: Any, s3_env: dict[str, str],
                                                            prefix: str, tmp_path: Path) -> None:
    uri = upload_model(s3, prefix, tiny_model_dir)
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", RESOLVE, s3.endpoint, uri, str(tmp_path / f"pod-{i}"), str(cache)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    paths = {json.loads(out.strip().splitlines()[-1])["path"] for out, _ in outs}
    assert len(paths) == 1, paths  # every pod reads the one entry
    (entry,) = paths
    assert (Path(entry) / modeling.COMPLETE).is_file()
    assert not list((cache / "models").glob(".partial-*"))  # the losers removed their copies
    wanted = sorted(p.relative_to(tiny_model_dir).as_posix() for p in tiny_model_dir.rglob("*") if p.is_file())
    got = sorted(p.relative_to(entry).as_posix() for p in Path(entry).rglob("*") if p.is_file())
    assert got == sorted([*wanted, modeling.COMPLETE])
