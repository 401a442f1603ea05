"""What the watches have shown: the resources, their Jobs and their pods (an informer cache).

Reconciles read from here instead of GETting the resource, its Job and its pods on every event,
so a reconcile that changes nothing makes no API call. The watches feed it (kopf event handlers)
and so do the operator's own writes (the API server's answer), so a reconcile right after a
create or a status patch sees it even before the watch event arrives.

Only the fields the operator reads are kept (:func:`slim`): bodies lose ``managedFields`` and the
``last-applied-configuration`` annotation, pods keep their status, not their spec. Keys are
``(kind, namespace, name)`` of the FineTuneJob/MergeJob; Jobs and pods are filed under their
owner (the ``kubetune.dev/owner`` annotation the operator puts on both).
"""

from __future__ import annotations

import threading
from typing import Any

from kubetune import contract
from kubetune_operator.builders import LABEL_OWNER, PLURAL

Key = tuple[str, str, str]
TRAIN, PREPARE = "train", contract.STAGE_PREPARE  # a FineTuneJob's two Jobs (a MergeJob has one: TRAIN)
CONTROLLER_UID = "batch.kubernetes.io/controller-uid"
_DROP_ANNOTATIONS = ("kubectl.kubernetes.io/last-applied-configuration",)


def key_of(body: dict[str, Any]) -> Key:
    meta = body["metadata"]
    return body["kind"], meta.get("namespace") or "", meta["name"]


def owner_of(child: dict[str, Any]) -> Key | None:
    """The FineTuneJob/MergeJob a Job or pod belongs to, from its owner annotation."""
    meta = child.get("metadata") or {}
    kind, _, name = ((meta.get("annotations") or {}).get(LABEL_OWNER) or "").partition("/")
    return (kind, meta.get("namespace") or "", name) if kind in PLURAL and name else None


def stage_of(job: dict[str, Any]) -> str:
    """Which of its owner's Jobs this is: the prepare stage's (its label) or the main one."""
    labels = (job.get("metadata") or {}).get("labels") or {}
    return PREPARE if labels.get(contract.LABEL_STAGE) == contract.STAGE_PREPARE else TRAIN


def _slim_meta(meta: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in meta.items() if k != "managedFields"}
    annotations = meta.get("annotations")
    if annotations and any(a in annotations for a in _DROP_ANNOTATIONS):
        out["annotations"] = {k: v for k, v in annotations.items() if k not in _DROP_ANNOTATIONS}
    return out


def slim(obj: dict[str, Any]) -> dict[str, Any]:
    """The object without what the operator never reads (pods: no spec; Jobs: the spec fields status and suspend read).
    ``kind`` must be set (LIST answers leave it out of their items)."""
    out = {k: v for k, v in obj.items() if k != "metadata"}
    out["metadata"] = _slim_meta(obj.get("metadata") or {})
    if obj.get("kind") == "Pod":
        out.pop("spec", None)
    elif obj.get("kind") == "Job":
        spec = obj.get("spec") or {}
        kept = ("suspend", "activeDeadlineSeconds", "backoffLimit", "ttlSecondsAfterFinished", "parallelism")
        out["spec"] = {k: spec[k] for k in kept if k in spec}
    return out


def _older(new: dict[str, Any], cached: dict[str, Any] | None) -> bool:
    """True when ``new`` is an older version of the same object than ``cached``. resourceVersions
    are opaque strings to clients; the API server (etcd) makes them increasing integers, and a
    version that does not parse as one is taken as newer."""
    if cached is None or new["metadata"].get("uid") != cached["metadata"].get("uid"):
        return False
    try:
        return int(new["metadata"].get("resourceVersion")) < int(cached["metadata"].get("resourceVersion"))
    except (TypeError, ValueError):
        return False


def _rv(obj: dict[str, Any] | None) -> int | None:
    try:
        return int((obj or {}).get("metadata", {}).get("resourceVersion"))
    except (TypeError, ValueError):
        return None


def _stale(cached: dict[str, Any], list_rv: int | None) -> bool:
    """A cached object missing from a list taken at ``list_rv`` is gone, unless the cache saw a
    version newer than the list (created or changed after it): that one stays."""
    rv = _rv(cached)
    return list_rv is None or rv is None or rv <= list_rv


class Cache:
    """Thread-safe: kopf's event loop writes, the worker threads read."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._resources: dict[Key, dict[str, Any]] = {}
        self._jobs: dict[str, dict[Key, dict[str, Any]]] = {TRAIN: {}, PREPARE: {}}
        self._pods: dict[Key, dict[str, dict[str, Any]]] = {}

    # -- resources

    def put(self, body: dict[str, Any]) -> Key:
        """Store the resource unless the cache already holds a newer version of it (a watch event
        that was in flight while the operator's own write came back)."""
        key = key_of(body)
        slimmed = slim(body)
        with self._lock:
            if not _older(slimmed, self._resources.get(key)):
                self._resources[key] = slimmed
        return key

    def update(self, body: dict[str, Any]) -> None:
        """Like :meth:`put`, for the answer to the operator's own write: only while the resource is
        still cached, so a write racing its deletion cannot bring a deleted resource back."""
        key = key_of(body)
        slimmed = slim(body)
        with self._lock:
            if key in self._resources and not _older(slimmed, self._resources[key]):
                self._resources[key] = slimmed

    def get(self, key: Key) -> dict[str, Any] | None:
        """A shallow copy (the caller may replace top-level fields such as ``status``)."""
        with self._lock:
            body = self._resources.get(key)
        return dict(body) if body is not None else None

    def drop(self, key: Key) -> None:
        with self._lock:
            self._resources.pop(key, None)

    def keys(self, kind: str | None = None) -> list[Key]:
        with self._lock:
            return [k for k in self._resources if kind is None or k[0] == kind]

    def merge_jobs_referencing(self, namespace: str, fine_tune_job: str) -> list[Key]:
        """MergeJobs whose ``spec.source.fineTuneJobRef`` names this FineTuneJob, and FineTuneJobs whose
        ``spec.model.adapterFrom.fineTuneJobRef`` does (chained: they wait for its adapter)."""
        def ref(body: dict[str, Any], *path: str) -> Any:
            node: Any = body.get("spec") or {}
            for part in path:
                node = (node or {}).get(part) if isinstance(node, dict) else None
            return node

        with self._lock:
            return [k for k, body in self._resources.items()
                    if k[1] == namespace and (
                        (k[0] == "MergeJob" and ref(body, "source", "fineTuneJobRef", "name") == fine_tune_job)
                        or (k[0] == "FineTuneJob"
                            and ref(body, "model", "adapterFrom", "fineTuneJobRef", "name") == fine_tune_job))]

    # -- children

    def put_child(self, child: dict[str, Any]) -> Key | None:
        """File a Job or pod under its owner; returns the owner's key (None: not ours)."""
        owner = owner_of(child)
        if owner is None:
            return None
        slimmed = slim(child)
        with self._lock:
            if child.get("kind") == "Job":
                jobs = self._jobs[stage_of(child)]
                if not _older(slimmed, jobs.get(owner)):
                    jobs[owner] = slimmed
            else:
                pods = self._pods.setdefault(owner, {})
                if not _older(slimmed, pods.get(child["metadata"]["name"])):
                    pods[child["metadata"]["name"]] = slimmed
        return owner

    def drop_child(self, child: dict[str, Any]) -> Key | None:
        owner = owner_of(child)
        if owner is None:
            return None
        meta = child["metadata"]
        with self._lock:
            if child.get("kind") == "Job":
                jobs = self._jobs[stage_of(child)]
                if (jobs.get(owner) or {}).get("metadata", {}).get("uid") == meta.get("uid"):
                    del jobs[owner]
            else:
                pods = self._pods.get(owner) or {}
                if (pods.get(meta["name"]) or {}).get("metadata", {}).get("uid") == meta.get("uid"):
                    del pods[meta["name"]]
                if not pods:
                    self._pods.pop(owner, None)
        return owner

    def job(self, key: Key, stage: str = TRAIN) -> dict[str, Any] | None:
        with self._lock:
            return self._jobs[stage].get(key)

    def pods(self, key: Key, job_uid: str) -> list[dict[str, Any]]:
        """The pods of that Job (by its controller-uid label: an older Job's pods do not count)."""
        with self._lock:
            pods = list((self._pods.get(key) or {}).values())
        return [p for p in pods if ((p["metadata"].get("labels") or {}).get(CONTROLLER_UID)) == job_uid]

    # -- relists (client-go's Replace): what a list no longer shows has vanished in a watch gap

    def prune(self, kind: str, namespace: str, listed: set[str], list_rv: int | None) -> list[Key]:
        """Drop resources of ``kind`` in ``namespace`` ("" = every namespace) that a list taken at
        ``list_rv`` does not show (names in ``listed`` as "namespace/name"). Returns the dropped keys."""
        with self._lock:
            gone = [k for k, body in self._resources.items()
                    if k[0] == kind and (not namespace or k[1] == namespace) and f"{k[1]}/{k[2]}" not in listed
                    and _stale(body, list_rv)]
            for k in gone:
                del self._resources[k]
                for jobs in self._jobs.values():
                    jobs.pop(k, None)
                self._pods.pop(k, None)
        return gone

    def prune_children(self, kind: str, namespace: str, listed: set[str], list_rv: int | None) -> set[Key]:
        """Drop Jobs or pods (``kind``) that a list taken at ``list_rv`` does not show (``listed``:
        their uids). Returns the owners whose children changed."""
        changed: set[Key] = set()
        with self._lock:
            for jobs in self._jobs.values() if kind == "Job" else []:
                for owner, job in list(jobs.items()):
                    if (not namespace or owner[1] == namespace) and job["metadata"].get("uid") not in listed \
                            and _stale(job, list_rv):
                        del jobs[owner]
                        changed.add(owner)
            for owner, pods in list(self._pods.items()) if kind == "Pod" else []:
                if namespace and owner[1] != namespace:
                    continue
                for name, pod in list(pods.items()):
                    if pod["metadata"].get("uid") not in listed and _stale(pod, list_rv):
                        del pods[name]
                        changed.add(owner)
                if not pods:
                    del self._pods[owner]
        return changed

    def forget_children(self, key: Key) -> None:
        with self._lock:
            for jobs in self._jobs.values():
                jobs.pop(key, None)
            self._pods.pop(key, None)

    def sizes(self) -> dict[str, int]:
        with self._lock:
            return {"resources": len(self._resources), "jobs": sum(len(j) for j in self._jobs.values()),
                    "pods": sum(len(p) for p in self._pods.values())}
