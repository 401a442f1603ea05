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
    bucket = server.make_bucket("storage-faults")  # in-process moto servers share one backend: a bucket of its own
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

    with pytest.raises(StorageError, match="cannot upload to s3://storage-faults/run/f"):
        publish()
    assert uploaded.is_set()
    server.start()
    assert not store.exists(f"{bucket}/run/manifest.json")


def capture_uploads(store: storage.Store) -> list[dict[str, str]]:
    """The headers of every PUT the store's client sends from now on, as sent."""
    sent: list[dict[str, str]] = []

    def record(request, **_):  # type: ignore[no-untyped-def]
        if request.method == "PUT":
            sent.append({k.lower(): v for k, v in request.headers.items()})

    store.client.meta.events.register("before-send.s3.*", record)
    return sent


def checksum_headers(headers: dict[str, str]) -> list[str]:
    return sorted(k for k in headers if k.startswith(("x-amz-checksum-", "x-amz-sdk-checksum-algorithm"))
                  or k == "x-amz-trailer")


@pytest.mark.parametrize("checksums,expected", [("whenSupported", True), ("whenRequired", False)])
def test_checksums_on_uploads_follow_the_spec(tmp_path: Path, bucket: str, s3, s3_env, checksums: str,  # type: ignore[no-untyped-def]
                                              expected: bool) -> None:
    """``whenRequired`` sends uploads without the checksum headers some S3-compatible servers reject;
    the default (boto3's own) adds them. Observed on the requests the client actually sends."""
    store = storage.Store.from_spec(api.Storage(endpoint=s3.endpoint, checksums=checksums))
    uploads = capture_uploads(store)
    (tmp_path / "small.txt").write_text("through s3transfer")
    store.put_text(f"{bucket}/ck/put.txt", "through put_object")
    store.upload_file(tmp_path / "small.txt", f"{bucket}/ck/file.txt")
    assert len(uploads) == 2
    for headers in uploads:
        assert bool(checksum_headers(headers)) is expected, headers
    assert store.get_text(f"{bucket}/ck/put.txt") == "through put_object"  # and the server stored both
    assert store.get_text(f"{bucket}/ck/file.txt") == "through s3transfer"


def test_checksums_default_and_values_in_the_api() -> None:
    assert api.Storage().checksums == "whenSupported"
    assert api.Storage.model_validate({"checksums": "whenRequired"}).checksums == "whenRequired"
    with pytest.raises(ValueError, match="checksums"):
        api.Storage.model_validate({"checksums": "never"})


@pytest.mark.parametrize("workers", [None, 3])
def test_connection_pool_holds_every_transfer_a_folder_opens(s3_env, workers: int | None) -> None:  # type: ignore[no-untyped-def]
    """``upload_dir``/``download_dir`` run ``workers`` files at once, each in up to ``max_concurrency``
    parts: the pool must hold all of those connections, or urllib3 discards and reopens them."""
    store = storage.Store(endpoint="http://127.0.0.1:9", **({"workers": workers} if workers else {}))
    at_once = store.workers * store._transfer_config().max_concurrency
    assert store.client.meta.config.max_pool_connections >= at_once
    assert store.client.meta.config.max_pool_connections <= at_once + storage.POOL_MARGIN
