"""Store against a real S3-compatible server (moto, server mode) and local folders."""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path

import pytest
from kubetune_trainer import storage
from kubetune_trainer.runtime import StorageError

from kubetune import api


def make_tree(root: Path) -> dict[str, bytes]:
    files = {"a.txt": b"alpha", "sub/b.bin": os.urandom(3 * 1024 * 1024), "sub/deeper/c.json": b"{}"}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


@pytest.fixture
def bucket(s3) -> str:  # type: ignore[no-untyped-def]
    return s3.make_bucket(f"st-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def store(s3, s3_env) -> storage.Store:  # type: ignore[no-untyped-def]
    return storage.Store.from_spec(api.Storage(endpoint=s3.endpoint))


@pytest.mark.parametrize("remote", ["s3", "local"])
def test_folder_round_trip_with_manifest(tmp_path: Path, bucket: str, store: storage.Store, remote: str) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    files = make_tree(src)
    uri = f"{bucket}/run" if remote == "s3" else str(tmp_path / "remote" / "run")
    digests = store.upload_dir(src, uri)
    assert sorted(digests) == sorted(files)
    assert storage.read_manifest(store, uri) is None
    manifest = storage.write_manifest(store, uri, digests, spec={"x": 1})
    assert store.list(uri) == sorted([*files, "manifest.json"])
    store.download_dir(uri, dst)
    for rel, data in files.items():
        assert (dst / rel).read_bytes() == data
    assert storage.read_manifest(store, uri) == manifest
    assert storage.verify_files(dst, manifest) == []
    (dst / "a.txt").write_bytes(b"tampered")
    (dst / "sub/deeper/c.json").unlink()
    assert storage.verify_files(dst, manifest) == ["a.txt", "sub/deeper/c.json"]


def test_multipart_upload_of_a_large_file(tmp_path: Path, bucket: str, store: storage.Store) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(40 * 1024 * 1024))  # above the 16 MiB multipart threshold
    digest = store.upload_file(big, f"{bucket}/big.bin")
    store.download_file(f"{bucket}/big.bin", tmp_path / "back.bin")
    assert storage.sha256_file(tmp_path / "back.bin") == digest


def test_json_exists_delete(bucket: str, store: storage.Store) -> None:
    uri = f"{bucket}/x/state.json"
    assert store.get_json(uri) is None and not store.exists(uri)
    store.put_json(uri, {"step": 3})
    assert store.exists(uri) and store.get_json(uri) == {"step": 3}
    store.put_text(f"{bucket}/x/y/z.txt", "z")
    store.delete(f"{bucket}/x")
    assert store.list(f"{bucket}/x") == []


def test_missing_bucket_and_missing_folder_fail_clearly(tmp_path: Path, bucket: str, store: storage.Store) -> None:
    with pytest.raises(StorageError, match="cannot write s3://no-such-bucket-kt/out/.kubetune-write-probe .*"
                                          "the bucket does not exist"):
        store.check_writable("s3://no-such-bucket-kt/out")
    with pytest.raises(StorageError, match="cannot list s3://no-such-bucket-kt/model .*the bucket does not exist"):
        store.download_dir("s3://no-such-bucket-kt/model", tmp_path)
    with pytest.raises(StorageError, match=f"{bucket}/model is empty or does not exist"):
        store.download_dir(f"{bucket}/model", tmp_path)


def test_unreachable_endpoint_fails_after_retries(tmp_path: Path, s3_env: dict[str, str]) -> None:
    dead = storage.Store(endpoint="http://127.0.0.1:9", max_attempts=2)
    (tmp_path / "f").write_text("x")
    with pytest.raises(StorageError, match=r"cannot upload to s3://any-bucket/f at http://127.0.0.1:9"):
        dead.upload_file(tmp_path / "f", "s3://any-bucket/f")


def test_server_stopped_mid_upload_never_leaves_a_manifest(tmp_path: Path, s3_factory, s3_env) -> None:  # type: ignore[no-untyped-def]
    server = s3_factory()
    bucket = server.make_bucket("faults")
    store = storage.Store(endpoint=server.endpoint, max_attempts=2, workers=2)
    src = tmp_path / "src"
    for i in range(40):
        (src / f"f{i:02d}.bin").parent.mkdir(parents=True, exist_ok=True)
        (src / f"f{i:02d}.bin").write_bytes(os.urandom(256 * 1024))
    uploaded = threading.Event()
    original = store.upload_file

    def upload_then_cut(path: Path, uri: str) -> str:
        digest = original(path, uri)
        if path.name == "f05.bin":
            server.stop()  # the network goes away in the middle of the folder
            uploaded.set()
        return digest

    store.upload_file = upload_then_cut  # type: ignore[method-assign]

    def publish() -> None:
        digests = store.upload_dir(src, f"{bucket}/run")
        storage.write_manifest(store, f"{bucket}/run", digests)

    with pytest.raises(StorageError, match="cannot upload to s3://faults/run/f"):
        publish()
    assert uploaded.is_set()
    server.start()
    assert not store.exists(f"{bucket}/run/manifest.json")
