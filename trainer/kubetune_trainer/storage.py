"""Object storage for models, datasets, checkpoints and results: any S3 endpoint, or a local folder.

A uri starting with ``s3://`` goes through boto3 (path-style addressing by default, multipart
transfers, retries); anything else (a path or ``file://``) is a local folder, so ``kubetune run``
can write results to disk with the same code. Every failure that survives the retries becomes a
:class:`~kubetune_trainer.runtime.StorageError` naming the uri and the endpoint.

``manifest.json`` is always written last: its presence means a folder is complete.

``spec.storage.checksums`` sets when boto3 adds checksums to requests and validates them in
responses: ``whenSupported`` (boto3's default since 1.36, a CRC32 on every upload) or
``whenRequired`` (only where S3 demands one), for S3-compatible servers that reject the newer
checksum headers (older Ceph RGW and MinIO). The client's connection pool holds as many
connections as a folder transfer opens at once: ``workers`` files, each in ``PART_CONCURRENCY``
parts, plus a small margin; fewer makes urllib3 discard and reopen connections
("Connection pool is full").
"""

from __future__ import annotations

import builtins
import datetime as dt
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubetune import __version__, api, contract
from kubetune_trainer.runtime import NotFound, StorageError

MB = 1024 * 1024
WORKERS = 8
"""Files transferred in parallel by ``upload_dir``/``download_dir``."""
PART_CONCURRENCY = 4
"""Parts of one multipart file transferred in parallel (s3transfer's ``max_concurrency``)."""
POOL_MARGIN = 4
"""Connections beyond what the transfers open, for single requests made meanwhile (put, list, head)."""
CHECKSUMS = {"whenSupported": "when_supported", "whenRequired": "when_required"}
"""``spec.storage.checksums`` -> botocore's ``request_checksum_calculation``/``response_checksum_validation``."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for part in parts:
        if part:
            out = f"{out}/{part.strip('/')}"
    return out


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} names no bucket")
    return bucket, key.strip("/")


def _local(uri: str) -> Path:
    return Path(uri[len("file://"):] if uri.startswith("file://") else uri)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(4 * MB), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


class Store:
    """One interface over S3 and local folders."""

    def __init__(self, endpoint: str | None = None, region: str = "us-east-1", addressing_style: str = "path",
                 access_key: str | None = None, secret_key: str | None = None, max_attempts: int = 5,
                 workers: int = WORKERS, checksums: str = "when_supported"):
        self.endpoint, self.workers = endpoint, workers
        self._client_args = dict(endpoint=endpoint, region=region, addressing_style=addressing_style,
                                 access_key=access_key, secret_key=secret_key, max_attempts=max_attempts,
                                 checksums=checksums)
        self._client: Any = None

    @classmethod
    def from_spec(cls, storage: api.Storage | None, env: Mapping[str, str] = os.environ) -> Store:
        storage = storage or api.Storage()
        return cls(
            endpoint=storage.endpoint or env.get("AWS_ENDPOINT_URL") or None,
            region=storage.region,
            addressing_style=storage.addressing_style,
            access_key=env.get(contract.ENV_AWS_ACCESS_KEY_ID),
            secret_key=env.get(contract.ENV_AWS_SECRET_ACCESS_KEY),
            checksums=CHECKSUMS[storage.checksums],
        )

    @property
    def pool_size(self) -> int:
        """Connections a folder transfer opens at once (``workers`` files x ``PART_CONCURRENCY`` parts),
        plus ``POOL_MARGIN``."""
        return self.workers * PART_CONCURRENCY + POOL_MARGIN

    # -- boto3 ---------------------------------------------------------------------------------
    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            a = self._client_args
            self._client = boto3.session.Session().client(
                "s3",
                endpoint_url=a["endpoint"],
                region_name=a["region"],
                aws_access_key_id=a["access_key"],
                aws_secret_access_key=a["secret_key"],
                config=Config(
                    retries={"max_attempts": a["max_attempts"], "mode": "standard"},
                    s3={"addressing_style": a["addressing_style"]},
                    connect_timeout=5,
                    read_timeout=60,
                    max_pool_connections=self.pool_size,
                    request_checksum_calculation=a["checksums"],
                    response_checksum_validation=a["checksums"],
                ),
            )
        return self._client

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=16 * MB, multipart_chunksize=16 * MB,
                              max_concurrency=PART_CONCURRENCY, use_threads=True)

    def _fail(self, action: str, uri: str, err: BaseException) -> StorageError:
        where = f" at {self.endpoint}" if self.endpoint else ""
        detail = getattr(err, "response", {}).get("Error", {}) if hasattr(err, "response") else {}
        code = detail.get("Code") if isinstance(detail, dict) else None
        reason = {
            "NoSuchBucket": "the bucket does not exist",
            "AccessDenied": "access denied (check the storage Secret and the bucket policy)",
            "InvalidAccessKeyId": "the access key is not known to the server",
            "SignatureDoesNotMatch": "the secret key is wrong",
        }.get(code or "", f"{type(err).__name__}: {err}")
        error = NotFound if code == "NoSuchBucket" else StorageError
        return error(f"cannot {action} {uri}{where}: {reason}")

    # -- single objects -------------------------------------------------------------------------
    def upload_file(self, path: Path, uri: str) -> str:
        """Upload one file (multipart above 16 MiB, retried); returns its sha256."""
        digest = sha256_file(path)
        if not is_s3(uri):
            dest = _local(uri)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if Path(path).resolve() != dest.resolve():
                shutil.copyfile(path, dest)
            return digest
        bucket, key = split_s3(uri)
        try:
            self.client.upload_file(str(path), bucket, key, Config=self._transfer_config())
        except Exception as err:  # noqa: BLE001 - boto3 raises many types; all mean "not stored"
            raise self._fail("upload to", uri, err) from err
        return digest

    def download_file(self, uri: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not is_s3(uri):
            try:
                shutil.copyfile(_local(uri), path)
            except OSError as err:
                raise StorageError(f"cannot read {uri}: {err.strerror}") from err
            return
        bucket, key = split_s3(uri)
        try:
            self.client.download_file(bucket, key, str(path), Config=self._transfer_config())
        except Exception as err:  # noqa: BLE001
            raise self._fail("download", uri, err) from err

    def put_text(self, uri: str, text: str) -> None:
        if not is_s3(uri):
            dest = _local(uri)
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".tmp")
            tmp.write_text(text)
            tmp.replace(dest)  # atomic: readers never see half a file
            return
        bucket, key = split_s3(uri)
        try:
            self.client.put_object(Bucket=bucket, Key=key, Body=text.encode())
        except Exception as err:  # noqa: BLE001
            raise self._fail("write", uri, err) from err

    def get_text(self, uri: str) -> str | None:
        if not is_s3(uri):
            path = _local(uri)
            return path.read_text() if path.is_file() else None
        bucket, key = split_s3(uri)
        try:
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
        except Exception as err:  # noqa: BLE001
            code = getattr(err, "response", {}).get("Error", {}).get("Code")
            if code in ("NoSuchKey", "404"):
                return None
            raise self._fail("read", uri, err) from err

    def put_json(self, uri: str, obj: Any) -> None:
        self.put_text(uri, json.dumps(obj, indent=2, sort_keys=True))

    def get_json(self, uri: str) -> Any | None:
        text = self.get_text(uri)
        return None if text is None else json.loads(text)

    def exists(self, uri: str) -> bool:
        if not is_s3(uri):
            return _local(uri).exists()
        bucket, key = split_s3(uri)
        try:
            self.client.head_object(Bucket=bucket, Key=key)
            return True
        except Exception as err:  # noqa: BLE001
            if getattr(err, "response", {}).get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._fail("check", uri, err) from err

    # -- folders --------------------------------------------------------------------------------
    def list(self, uri: str) -> builtins.list[str]:
        """Keys under a folder, relative to it, sorted."""
        if not is_s3(uri):
            root = _local(uri)
            return _files(root) if root.is_dir() else []
        bucket, prefix = split_s3(uri)
        prefix = f"{prefix}/" if prefix else ""
        keys: builtins.list[str] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                keys.extend(obj["Key"][len(prefix):] for obj in page.get("Contents", []))
        except Exception as err:  # noqa: BLE001
            raise self._fail("list", uri, err) from err
        return sorted(keys)

    def upload_dir(self, local: Path, uri: str, exclude: Callable[[str], bool] | None = None) -> dict[str, str]:
        """Upload every file under ``local`` in parallel; returns ``{relative path: sha256}``."""
        rels = [r for r in _files(Path(local)) if not (exclude and exclude(r))]
        with ThreadPoolExecutor(self.workers) as pool:
            digests = list(pool.map(lambda r: self.upload_file(Path(local) / r, join(uri, r)), rels))
        return dict(zip(rels, digests, strict=True))

    def download_dir(self, uri: str, local: Path) -> builtins.list[Path]:
        rels = self.list(uri)
        if not rels:
            raise StorageError(f"{uri} is empty or does not exist")
        with ThreadPoolExecutor(self.workers) as pool:
            list(pool.map(lambda r: self.download_file(join(uri, r), Path(local) / r), rels))
        return [Path(local) / r for r in rels]

    def delete(self, uri: str) -> None:
        """Delete a folder (everything under the prefix) or a single object."""
        if not is_s3(uri):
            path = _local(uri)
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
            return
        bucket, prefix = split_s3(uri)
        keys = [join(prefix, k) if k else prefix for k in self.list(uri)] or [prefix]
        try:
            for start in range(0, len(keys), 1000):
                batch = [{"Key": k} for k in keys[start:start + 1000]]
                self.client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        except Exception as err:  # noqa: BLE001
            raise self._fail("delete", uri, err) from err

    def check_writable(self, uri: str) -> None:
        """Fail early (before hours of work) when the output cannot be written."""
        probe = join(uri, ".kubetune-write-probe")
        self.put_text(probe, "probe")
        self.delete(probe)


# -- manifests ----------------------------------------------------------------------------------


def write_manifest(store: Store, uri: str, files: dict[str, str], **fields: Any) -> dict[str, Any]:
    """Write ``<uri>/manifest.json`` — call it LAST, after every file listed is stored."""
    manifest = {
        "kubetuneVersion": __version__,
        "createdAt": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **fields,
        "files": dict(sorted(files.items())),
    }
    store.put_json(join(uri, contract.MANIFEST), manifest)
    return manifest


def read_manifest(store: Store, uri: str) -> dict[str, Any] | None:
    return store.get_json(join(uri, contract.MANIFEST))


def verify_files(local: Path, manifest: dict[str, Any], prefix: str = "") -> list[str]:
    """Paths (relative to ``prefix`` in the manifest) whose content is missing or differs."""
    bad = []
    for rel, digest in manifest.get("files", {}).items():
        if prefix and not rel.startswith(prefix):
            continue
        path = Path(local) / rel[len(prefix):]
        if not path.is_file() or sha256_file(path) != digest:
            bad.append(rel)
    return bad
