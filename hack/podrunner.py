#!/usr/bin/env python3
"""A tiny kubelet for ONE node that runs pod containers as local processes. TEST AND DEMO ONLY.

The local control plane (``hack/cluster.py``) has a node ``runner-node`` that kwok does not
manage. This pod runner plays kubelet for it: every pod bound to that node (``spec.nodeName``)
is run as a local process, so the operator, the trainer and the merge run for real, end to
end, on a machine without Docker or a kubelet. It is not a security boundary and not a
container runtime: the image is ignored, the process runs as the current user with the repo
venv's ``bin`` first on PATH (``kubetune`` resolves there).

What it does, like a kubelet:

- env: ``value`` (with ``$(VAR)`` expansion), ``valueFrom.secretKeyRef`` / ``configMapKeyRef``
  (read through the API), ``fieldRef`` (metadata.name/namespace/uid/labels/annotations,
  spec.nodeName, spec.serviceAccountName, status.podIP/hostIP), ``resourceFieldRef``
  (limits/requests cpu and memory), ``envFrom``;
- volumes as folders under the work dir: ``emptyDir``, ``configMap`` and ``secret`` (files
  written), ``downwardAPI``, ``projected`` (serviceAccountToken minted with the TokenRequest
  API for the pod's ServiceAccount and bound to the pod; configMap, secret, downwardAPI),
  ``hostPath`` (the host path itself);
- processes cannot see the pod's absolute paths, so env values and command/args that start
  with a volume mountPath (also ``--flag=/mount/path``) are rewritten to the local folder;
- ``KUBETUNE_TERMINATION_LOG`` points at the container's termination-message file,
  ``KUBETUNE_SERVICEACCOUNT_DIR`` at the token folder, ``KUBERNETES_SERVICE_HOST/PORT`` and
  ``KUBETUNE_API_SERVER`` at the API server of the kubeconfig;
- status: Pending (ContainerCreating) -> Running (containerStatuses running, startedAt,
  Ready/ContainersReady conditions) -> Succeeded/Failed with exitCode, reason
  (Completed / Error / OOMKilled / DeadlineExceeded), the termination message (file content,
  or the log tail with ``FallbackToLogsOnError``) and finishedAt; ``restartPolicy: OnFailure``
  restarts the container (restartCount);
- ``resources.limits.memory`` is enforced by a watchdog over the process tree's RSS (SIGKILL,
  reason OOMKilled, exit 137), as is ``activeDeadlineSeconds``;
- deletion (deletionTimestamp): SIGTERM to the main process, wait the grace period, SIGKILL
  the process group, write the final status, then delete the pod with grace 0;
- keeps the node's Ready condition fresh (heartbeat);
- one log file per pod (stdout+stderr of all its containers) under the log dir; the path is
  printed, ``tail -f`` it.

Only pods on the given node are touched. Init containers run one after the other; one main
container per pod (a pod with more is failed with a clear message).

Library::

    with PodRunner(kubeconfig, node="runner-node", workdir=tmp) as runner:
        ...                               # pods bound to runner-node now run
        runner.log_path("ns", "pod-name")

CLI::

    python hack/podrunner.py --kubeconfig "$KUBECONFIG" --node runner-node [--echo]
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import datetime as dt
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlparse

REPO_ROOT = Path(__file__).resolve().parent.parent

# Kept in sync with kubetune/contract.py (not imported: the runner must not depend on the package).
ENV_TERMINATION_LOG = "KUBETUNE_TERMINATION_LOG"
ENV_SA_DIR = "KUBETUNE_SERVICEACCOUNT_DIR"
ENV_API_SERVER = "KUBETUNE_API_SERVER"
SA_MOUNT_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"

TERMINATION_MESSAGE_LIMIT = 4096  # bytes, like the kubelet
FALLBACK_LOG_LINES, FALLBACK_LOG_BYTES = 80, 2048
DEFAULT_GRACE_SECONDS = 30
CONFIG_RETRY_SECONDS = 2.0


class PodConfigError(Exception):
    """The pod cannot start yet (missing Secret/ConfigMap key...): CreateContainerConfigError."""


class ApiError(Exception):
    def __init__(self, status: int, body: str, method: str, path: str) -> None:
        self.status = status
        super().__init__(f"{method} {path} -> {status}: {body[:300]}")


def log(msg: str) -> None:
    print(f"[podrunner] {msg}", file=sys.stderr, flush=True)


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------------------------
# Pure helpers (unit-tested)
# ----------------------------------------------------------------------------------------------

_SUFFIXES = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
}


def parse_quantity(q: str | int | float) -> float:
    """A Kubernetes quantity ('512Mi', '1.5', '250m', '2G', '1e3') as a number."""
    if isinstance(q, int | float):
        return float(q)
    m = re.fullmatch(r"\s*([+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", q)
    if not m or m.group(2) not in _SUFFIXES:
        raise ValueError(f"not a quantity: {q!r}")
    return float(m.group(1)) * _SUFFIXES[m.group(2)]


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand_vars(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: defined names are replaced, ``$$`` escapes, others stay."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return _VAR_REF.sub(sub, value)


def rewrite_path(value: str, mounts: Mapping[str, str]) -> str:
    """Map a path inside the pod to the local folder when it starts with a mountPath.

    ``mounts`` is {mountPath: local path}; the longest matching mountPath wins. A value shaped
    ``--flag=/path`` has its path part rewritten.
    """
    if value.startswith("-") and "=" in value:
        flag, _, rest = value.partition("=")
        rewritten = rewrite_path(rest, mounts)
        return value if rewritten == rest else f"{flag}={rewritten}"
    for mount in sorted(mounts, key=len, reverse=True):
        base = mount.rstrip("/") or "/"
        if value == base or value.startswith(base.rstrip("/") + "/"):
            return mounts[mount] + value[len(base):]
    return value


def exit_code_of(returncode: int) -> int:
    """Popen's returncode (-N when killed by signal N) as a container exit code (128+N)."""
    return 128 - returncode if returncode < 0 else returncode


def termination_reason(exit_code: int, oom_killed: bool = False, deadline: bool = False) -> str:
    if oom_killed:
        return "OOMKilled"
    if deadline:
        return "DeadlineExceeded"
    return "Completed" if exit_code == 0 else "Error"


def log_tail(text: str, lines: int = FALLBACK_LOG_LINES, limit: int = FALLBACK_LOG_BYTES) -> str:
    """The kubelet's FallbackToLogsOnError message: the last 80 lines, at most 2048 bytes."""
    tail = "\n".join(text.splitlines()[-lines:])
    data = tail.encode()
    if len(data) > limit:
        data = data[-limit:]
    return data.decode(errors="ignore")


def termination_message(file_text: str, log_text: str, exit_code: int, policy: str) -> str:
    msg = file_text.encode()[:TERMINATION_MESSAGE_LIMIT].decode(errors="ignore")
    if not msg.strip() and policy == "FallbackToLogsOnError" and exit_code != 0:
        return log_tail(log_text)
    return msg


def field_ref_value(pod: Mapping[str, Any], path: str) -> str:
    """Value of a downward-API fieldRef (metadata.name, metadata.labels['x'], status.podIP...)."""
    meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {})
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    simple = {
        "metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"), "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.podIP": status.get("podIP") or "127.0.0.1", "status.hostIP": status.get("hostIP") or "127.0.0.1",
        "status.podIPs": status.get("podIP") or "127.0.0.1", "status.hostIPs": status.get("hostIP") or "127.0.0.1",
    }
    if path in ("metadata.labels", "metadata.annotations"):
        items = (meta.get(path.split(".")[1]) or {}).items()
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items))
    if path not in simple:
        raise PodConfigError(f"unsupported fieldRef {path!r}")
    return str(simple[path] or "")


def resource_field_value(container: Mapping[str, Any], ref: Mapping[str, Any]) -> str:
    """Value of a resourceFieldRef: limits/requests of cpu, memory, ephemeral-storage."""
    kind, _, res = ref["resource"].partition(".")
    resources = container.get("resources") or {}
    raw = (resources.get(kind) or {}).get(res)
    if raw is None and kind == "requests":
        raw = (resources.get("limits") or {}).get(res)
    if raw is None:  # no limit: the node's allocatable, like the kubelet
        raw = (os.cpu_count() or 1) if res == "cpu" else _total_memory()
    value = math.ceil(parse_quantity(raw) / parse_quantity(ref.get("divisor") or "1"))
    return str(max(1, value) if res == "cpu" else value)


def _total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 * 2**30


def key_items(data: Mapping[str, str], items: list[dict[str, Any]] | None) -> dict[str, str]:
    """{relative path: key} for a configMap/secret volume (all keys, or the listed items)."""
    if not items:
        return {k: k for k in data}
    return {it.get("path") or it["key"]: it["key"] for it in items}


# ----------------------------------------------------------------------------------------------
# API access: the kubernetes client's ApiClient, raw JSON in and out
# ----------------------------------------------------------------------------------------------


class Kube:
    """Raw JSON REST over ``kubernetes.client.ApiClient`` (the generated models are not needed)."""

    def __init__(self, kubeconfig: str | os.PathLike[str]) -> None:
        from kubernetes import config

        self.api = config.new_client_from_config(config_file=str(kubeconfig))
        self.server = self.api.configuration.host.rstrip("/")

    def request(self, method: str, path: str, body: Any = None, *, query: Mapping[str, Any] | None = None,
                content_type: str | None = None, ok404: bool = False, timeout: float = 30) -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type or "application/json"
        if query:
            path = f"{path}?{urlencode(query)}"
        method_, url, hdrs, body_, _ = self.api.param_serialize(
            method, path, header_params=headers, body=body, auth_settings=["BearerToken"])
        resp = self.api.call_api(method_, url, hdrs, body_, _request_timeout=timeout)
        data = resp.read()
        if resp.status == 404 and ok404:
            return None
        if resp.status >= 300:
            raise ApiError(resp.status, data.decode(errors="replace"), method, path)
        return json.loads(data) if data else {}

    def watch(self, path: str, query: Mapping[str, Any], stop: threading.Event) -> Iterator[dict[str, Any]]:
        """Stream watch events (raw dicts) until the server closes the stream or ``stop`` is set."""
        q = dict(query, watch="true", allowWatchBookmarks="true")
        method_, url, hdrs, _, _ = self.api.param_serialize(
            "GET", f"{path}?{urlencode(q)}", header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"])
        resp = self.api.call_api(method_, url, hdrs, _request_timeout=(10, int(q.get("timeoutSeconds", 30)) + 10))
        raw = resp.response
        try:
            if resp.status >= 300:
                raise ApiError(resp.status, raw.read().decode(errors="replace"), "WATCH", path)
            buf = b""
            for chunk in raw.stream(amt=None, decode_content=False):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
                if stop.is_set():
                    return
        finally:
            raw.release_conn()


# ----------------------------------------------------------------------------------------------
# One pod
# ----------------------------------------------------------------------------------------------


@dataclass
class ContainerResult:
    exit_code: int
    reason: str
    message: str
    started_at: str
    finished_at: str
    container_id: str
    restart_count: int = 0


@dataclass
class PodRun:
    """Book-keeping for one pod run by this runner."""

    namespace: str
    name: str
    uid: str
    dir: Path
    log_path: Path
    delete_requested: threading.Event = field(default_factory=threading.Event)
    grace_seconds: float = DEFAULT_GRACE_SECONDS
    proc: subprocess.Popen[bytes] | None = None
    thread: threading.Thread | None = None
    result: ContainerResult | None = None
    phase: str = "Pending"

    def request_delete(self, grace: float) -> None:
        self.grace_seconds = min(self.grace_seconds, grace) if self.delete_requested.is_set() else grace
        self.delete_requested.set()


def _child_setup() -> None:  # runs in the child between fork and exec
    os.setsid()  # own process group: SIGKILL reaches the whole tree
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort, non-glibc systems
        pass


def _oom_kills() -> int:
    try:
        for line in Path("/proc/vmstat").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class PodRunner:
    """Runs the pods bound to ``node`` as local processes and reports their status.

    ``extra_env`` is the base environment every container gets under the pod's own env (e.g.
    ``HF_HUB_OFFLINE``); ``default_command`` stands in for the image's entrypoint when a
    container has ``args`` but no ``command``.
    """

    def __init__(self, kubeconfig: str | os.PathLike[str], node: str = "runner-node",
                 workdir: str | os.PathLike[str] | None = None, log_dir: str | os.PathLike[str] | None = None,
                 extra_env: Mapping[str, str] | None = None, bin_dir: str | os.PathLike[str] | None = None,
                 default_command: tuple[str, ...] = ("kubetune",), heartbeat_seconds: float = 20.0,
                 echo: bool = False) -> None:
        self.kube = Kube(kubeconfig)
        self.node = node
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="kubetune-podrunner-"))
        self.log_dir = Path(log_dir) if log_dir else self.workdir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.extra_env = dict(extra_env or {})
        venv_bin = REPO_ROOT / ".venv" / "bin"
        self.bin_dir = Path(bin_dir) if bin_dir else (venv_bin if venv_bin.is_dir() else Path(sys.executable).parent)
        self.default_command = default_command
        self.heartbeat_seconds = heartbeat_seconds
        self.echo = echo
        self.runs: dict[str, PodRun] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watch_error: str | None = None
        self.stop_grace = 15.0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> PodRunner:
        """Start the watch and heartbeat threads; return once the first pod list was handled."""
        self.kube.request("GET", f"/api/v1/nodes/{self.node}")  # fail fast: wrong kubeconfig or node
        for target, name in ((self._watch_loop, "watch"), (self._heartbeat_loop, "heartbeat")):
            t = threading.Thread(target=target, name=f"podrunner-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        if not self._synced.wait(timeout):
            raise RuntimeError(f"pod runner did not sync within {timeout}s: {self._watch_error}")
        log(f"running pods of node {self.node}; logs in {self.log_dir}")
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Stop watching; terminate running pods (SIGTERM, then SIGKILL after ``timeout``)."""
        self.stop_grace = timeout
        self._stop.set()
        with self._lock:
            runs = list(self.runs.values())
        deadline = time.monotonic() + timeout + 5
        for run in runs:
            if run.thread is not None:
                run.thread.join(max(0.1, deadline - time.monotonic()))
        for t in self._threads:
            t.join(5)
        if self._own_workdir:
            shutil.rmtree(self.workdir / "pods", ignore_errors=True)

    def __enter__(self) -> PodRunner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_path(self, namespace: str, name: str) -> Path | None:
        """Log file of the most recent pod with this name."""
        with self._lock:
            runs = [r for r in self.runs.values() if r.namespace == namespace and r.name == name]
        return runs[-1].log_path if runs else None

    # -- watch ---------------------------------------------------------------------------------

    def _watch_loop(self) -> None:
        path = "/api/v1/pods"
        selector = {"fieldSelector": f"spec.nodeName={self.node}"}
        rv: str | None = None
        while not self._stop.is_set():
            try:
                if rv is None:
                    listing = self.kube.request("GET", path, query=selector)
                    for pod in listing.get("items", []):
                        self._on_pod("ADDED", pod)
                    rv = listing["metadata"]["resourceVersion"]
                    self._synced.set()
                for ev in self.kube.watch(path, {**selector, "resourceVersion": rv, "timeoutSeconds": 10},
                                          self._stop):
                    obj = ev.get("object") or {}
                    if ev.get("type") == "ERROR":
                        rv = None if obj.get("code") == 410 else rv
                        break
                    rv = obj.get("metadata", {}).get("resourceVersion", rv)
                    if ev.get("type") != "BOOKMARK":
                        self._on_pod(ev["type"], obj)
            except Exception as e:  # noqa: BLE001 - keep watching across API hiccups
                self._watch_error = f"{type(e).__name__}: {e}"
                if not self._stop.is_set():
                    log(f"watch error (retrying): {self._watch_error}")
                    rv = None
                    self._stop.wait(1.0)

    def _on_pod(self, event: str, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod.get("spec", {})
        if spec.get("nodeName") != self.node:
            return
        uid, phase = meta["uid"], pod.get("status", {}).get("phase", "Pending")
        deleting = meta.get("deletionTimestamp") is not None or event == "DELETED"
        grace = meta.get("deletionGracePeriodSeconds")
        grace = float(grace if grace is not None else spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS))
        with self._lock:
            run = self.runs.get(uid)
            if run is None:
                if event == "DELETED":
                    return
                if phase in ("Succeeded", "Failed") or deleting:
                    if deleting:
                        self._finalize_delete(meta["namespace"], meta["name"], uid)
                    return
                if phase == "Running":  # started by an earlier runner that is gone: its process died
                    self._patch_status(pod, {"phase": "Failed", "reason": "PodRunnerRestarted",
                                             "message": "the pod runner restarted while this pod ran"})
                    return
                run = self._new_run(pod)
                self.runs[uid] = run
                run.thread = threading.Thread(target=self._run_pod, args=(run, pod), daemon=True,
                                              name=f"pod-{meta['namespace']}/{meta['name']}")
                run.thread.start()
                return
        if deleting:
            run.request_delete(grace)
            if run.thread is not None and not run.thread.is_alive():  # already finished: just remove it
                self._finalize_delete(run.namespace, run.name, run.uid)

    def _new_run(self, pod: dict[str, Any]) -> PodRun:
        meta = pod["metadata"]
        base = f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}"
        d = self.workdir / "pods" / base
        d.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{base}.log"
        log(f"pod {meta['namespace']}/{meta['name']}: log {log_path}")
        return PodRun(meta["namespace"], meta["name"], meta["uid"], d, log_path)

    # -- API helpers -------------------------------------------------------------------------

    def _pod_path(self, namespace: str, name: str) -> str:
        return f"/api/v1/namespaces/{namespace}/pods/{name}"

    def _patch_status(self, pod: dict[str, Any], status: dict[str, Any]) -> None:
        meta = pod["metadata"]
        try:
            self.kube.request("PATCH", self._pod_path(meta["namespace"], meta["name"]) + "/status",
                              {"metadata": {"uid": meta["uid"]}, "status": status},
                              content_type="application/strategic-merge-patch+json")
        except ApiError as e:
            if e.status not in (404, 409):
                log(f"status update of {meta['namespace']}/{meta['name']} failed: {e}")

    def _finalize_delete(self, namespace: str, name: str, uid: str) -> None:
        try:
            self.kube.request("DELETE", self._pod_path(namespace, name),
                              {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0,
                               "preconditions": {"uid": uid}}, ok404=True)
        except ApiError as e:
            if e.status != 409:  # 409: a re-created namesake, not ours
                log(f"delete of {namespace}/{name} failed: {e}")

    def _get(self, kind: str, namespace: str, name: str, optional: bool) -> dict[str, str] | None:
        """Data of a Secret (decoded) or ConfigMap; None when optional and missing."""
        obj = self.kube.request("GET", f"/api/v1/namespaces/{namespace}/{kind}s/{name}", ok404=True)
        if obj is None:
            if optional:
                return None
            raise PodConfigError(f'{kind} "{name}" not found')
        if kind == "secret":
            return {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
        return {**(obj.get("data") or {}),
                **{k: base64.b64decode(v).decode() for k, v in (obj.get("binaryData") or {}).items()}}

    def _key(self, kind: str, namespace: str, ref: Mapping[str, Any]) -> str | None:
        data = self._get(kind, namespace, ref["name"], bool(ref.get("optional")))
        if data is None or ref["key"] not in data:
            if ref.get("optional"):
                return None
            raise PodConfigError(f'couldn\'t find key {ref["key"]} in {kind} {namespace}/{ref["name"]}')
        return data[ref["key"]]

    def _mint_token(self, pod: dict[str, Any], audience: str | None, seconds: int) -> str:
        meta, spec = pod["metadata"], pod["spec"]
        sa = spec.get("serviceAccountName") or "default"
        body: dict[str, Any] = {
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"expirationSeconds": max(600, seconds),
                     "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": meta["name"], "uid": meta["uid"]}},
        }
        if audience:
            body["spec"]["audiences"] = [audience]
        r = self.kube.request("POST", f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{sa}/token", body)
        return str(r["status"]["token"])

    # -- volumes and env -----------------------------------------------------------------------

    def _write_files(self, target: Path, files: Mapping[str, str]) -> None:
        for rel, content in files.items():
            p = target / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(content)

    def _keyed_files(self, kind: str, namespace: str, name: str, items: list[dict[str, Any]] | None,
                     optional: bool) -> dict[str, str]:
        data = self._get(kind, namespace, name, optional)
        if data is None:
            return {}
        missing = [it["key"] for it in items or [] if it["key"] not in data and not optional]
        if missing:
            raise PodConfigError(f"{kind} {namespace}/{name} has no key {missing[0]}")
        return {rel: data[key] for rel, key in key_items(data, items).items() if key in data}

    def _prepare_volumes(self, run: PodRun, pod: dict[str, Any]) -> tuple[dict[str, Path], Path | None]:
        """Materialise the pod's volumes; returns {volume name: folder} and the token folder."""
        ns = pod["metadata"]["namespace"]
        folders: dict[str, Path] = {}
        token_dir: Path | None = None
        for vol in pod["spec"].get("volumes") or []:
            name = vol["name"]
            d = run.dir / "volumes" / name
            if "hostPath" in vol:
                folders[name] = Path(vol["hostPath"]["path"])
                continue
            d.mkdir(parents=True, exist_ok=True)
            folders[name] = d
            if "configMap" in vol:
                cm = vol["configMap"]
                self._write_files(d, self._keyed_files("configmap", ns, cm["name"], cm.get("items"),
                                                       bool(cm.get("optional"))))
            elif "secret" in vol:
                sec = vol["secret"]
                self._write_files(d, self._keyed_files("secret", ns, sec["secretName"], sec.get("items"),
                                                       bool(sec.get("optional"))))
            elif "downwardAPI" in vol:
                self._write_files(d, {it["path"]: field_ref_value(pod, it["fieldRef"]["fieldPath"])
                                      for it in vol["downwardAPI"].get("items", []) if "fieldRef" in it})
            elif "projected" in vol:
                for src in vol["projected"].get("sources") or []:
                    if "serviceAccountToken" in src:
                        t = src["serviceAccountToken"]
                        token = self._mint_token(pod, t.get("audience"), int(t.get("expirationSeconds", 3600)))
                        self._write_files(d, {t["path"]: token})
                        token_dir = token_dir or d
                    elif "configMap" in src:
                        cm = src["configMap"]
                        self._write_files(d, self._keyed_files("configmap", ns, cm["name"], cm.get("items"),
                                                               bool(cm.get("optional"))))
                    elif "secret" in src:
                        sec = src["secret"]
                        self._write_files(d, self._keyed_files("secret", ns, sec["name"], sec.get("items"),
                                                               bool(sec.get("optional"))))
                    elif "downwardAPI" in src:
                        self._write_files(d, {it["path"]: field_ref_value(pod, it["fieldRef"]["fieldPath"])
                                              for it in src["downwardAPI"].get("items", []) if "fieldRef" in it})
            # emptyDir (any medium), persistentVolumeClaim, ephemeral...: an empty folder
        return folders, token_dir

    def _mounts(self, container: dict[str, Any], folders: Mapping[str, Path]) -> dict[str, str]:
        mounts: dict[str, str] = {}
        for m in container.get("volumeMounts") or []:
            if m["name"] not in folders:
                raise PodConfigError(f"volumeMount {m['name']!r} names no volume")
            local = folders[m["name"]]
            if m.get("subPath"):
                local = local / m["subPath"]
                if not local.exists() and local.parent == folders[m["name"]]:
                    local.mkdir(parents=True, exist_ok=True)
            mounts[m["mountPath"]] = str(local)
        return mounts

    def _container_env(self, pod: dict[str, Any], container: dict[str, Any], mounts: Mapping[str, str],
                       token_dir: Path | None, term_file: Path) -> dict[str, str]:
        ns = pod["metadata"]["namespace"]
        server = urlparse(self.kube.server)
        env: dict[str, str] = {
            "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": os.environ.get("HOME", "/root"),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "HOSTNAME": pod["metadata"]["name"],
            "PYTHONUNBUFFERED": "1",
            "KUBERNETES_SERVICE_HOST": server.hostname or "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(server.port or 443),
            ENV_API_SERVER: self.kube.server,
            **self.extra_env,
        }
        base = dict(env)  # the runner's own values (PATH, HOME...) are paths on this machine: never rewritten
        for src in container.get("envFrom") or []:
            prefix = src.get("prefix", "")
            ref = src.get("configMapRef") or src.get("secretRef")
            kind = "configmap" if "configMapRef" in src else "secret"
            data = self._get(kind, ns, ref["name"], bool(ref.get("optional"))) or {}
            env.update({f"{prefix}{k}": v for k, v in data.items()})
        for var in container.get("env") or []:
            name, value = var["name"], None
            if "valueFrom" not in var:
                value = expand_vars(var.get("value", ""), env)
            else:
                vf = var["valueFrom"]
                if "secretKeyRef" in vf:
                    value = self._key("secret", ns, vf["secretKeyRef"])
                elif "configMapKeyRef" in vf:
                    value = self._key("configmap", ns, vf["configMapKeyRef"])
                elif "fieldRef" in vf:
                    value = field_ref_value(pod, vf["fieldRef"]["fieldPath"])
                elif "resourceFieldRef" in vf:
                    value = resource_field_value(container, vf["resourceFieldRef"])
            if value is not None:
                env[name] = value
        env = {k: v if base.get(k) == v else rewrite_path(v, mounts) for k, v in env.items()}
        env[ENV_TERMINATION_LOG] = str(term_file)
        if ENV_SA_DIR not in env:
            sa_dir = mounts.get(SA_MOUNT_PATH) or (str(token_dir) if token_dir else None)
            if sa_dir:
                env[ENV_SA_DIR] = sa_dir
        return env

    def _argv(self, container: dict[str, Any], env: Mapping[str, str], mounts: Mapping[str, str]) -> list[str]:
        command = list(container.get("command") or self.default_command)
        argv = command + list(container.get("args") or [])
        return [rewrite_path(expand_vars(a, env), mounts) for a in argv]

    # -- running -------------------------------------------------------------------------------

    def _run_pod(self, run: PodRun, pod: dict[str, Any]) -> None:
        try:
            self._run_pod_inner(run, pod)
        except Exception as e:  # noqa: BLE001 - a pod's failure must not kill the runner
            log(f"pod {run.namespace}/{run.name}: runner error: {type(e).__name__}: {e}")
            self._patch_status(pod, {"phase": "Failed", "reason": "PodRunnerError", "message": str(e)[:1000]})
            run.phase = "Failed"
        if run.delete_requested.is_set():
            self._finalize_delete(run.namespace, run.name, run.uid)

    def _base_conditions(self, pod: dict[str, Any], ready: bool, reason: str | None = None) -> list[dict[str, Any]]:
        now = now_iso()
        old = {c["type"]: c for c in pod.get("status", {}).get("conditions") or []}
        conds = []
        for ctype, status in (("PodReadyToStartContainers", True), ("Initialized", True),
                              ("Ready", ready), ("ContainersReady", ready)):
            c: dict[str, Any] = {"type": ctype, "status": "True" if status else "False", "lastTransitionTime": now,
                                 "lastProbeTime": None}
            if not status and reason:
                c["reason"] = reason
            conds.append(c)
        if "PodScheduled" in old:
            conds.append(old["PodScheduled"])
        return conds

    def _run_pod_inner(self, run: PodRun, pod: dict[str, Any]) -> None:
        spec = pod["spec"]
        containers = spec.get("containers") or []
        start_time = now_iso()
        waiting = [{"name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": False, "restartCount": 0,
                    "started": False, "state": {"waiting": {"reason": "ContainerCreating"}}} for c in containers]
        self._patch_status(pod, {"phase": "Pending", "startTime": start_time, "hostIP": "127.0.0.1",
                                 "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
                                 "hostIPs": [{"ip": "127.0.0.1"}], "containerStatuses": waiting})
        if len(containers) != 1:
            self._terminal(run, pod, "Failed", [],
                           message=f"podrunner runs one container per pod, got {len(containers)}")
            return
        # Config (volumes + env) may be missing at first: retry like the kubelet until deleted.
        while True:
            try:
                folders, token_dir = self._prepare_volumes(run, pod)
                break
            except PodConfigError as e:
                if self._config_wait(run, pod, containers[0], str(e)):
                    return
        deadline = spec.get("activeDeadlineSeconds")
        deadline_at = time.monotonic() + float(deadline) if deadline else None
        restart = spec.get("restartPolicy", "Always")
        for init in spec.get("initContainers") or []:
            res = self._run_container_until_done(run, pod, init, folders, token_dir, deadline_at, restart, init=True)
            if res is None:
                return
            if res.exit_code != 0:
                self._terminal(run, pod, "Failed", [], init_results={init["name"]: res})
                return
        c = containers[0]
        res = self._run_container_until_done(run, pod, c, folders, token_dir, deadline_at, restart, init=False)
        if res is None:
            return
        phase = "Succeeded" if res.exit_code == 0 else "Failed"
        deadline_reason = "DeadlineExceeded" if res.reason == "DeadlineExceeded" else None
        self._terminal(run, pod, phase, [(c, res)], reason=deadline_reason)

    def _config_wait(self, run: PodRun, pod: dict[str, Any], container: dict[str, Any], message: str) -> bool:
        """Report CreateContainerConfigError and wait; True when the pod was deleted meanwhile."""
        st = {"name": container["name"], "image": container.get("image", ""), "imageID": "", "ready": False,
              "restartCount": 0, "started": False,
              "state": {"waiting": {"reason": "CreateContainerConfigError", "message": message}}}
        self._patch_status(pod, {"phase": "Pending", "containerStatuses": [st]})
        if run.delete_requested.wait(CONFIG_RETRY_SECONDS) or self._stop.is_set():
            self._terminal(run, pod, "Failed", [], message=f"deleted before start: {message}")
            return True
        return False

    def _run_container_until_done(self, run: PodRun, pod: dict[str, Any], c: dict[str, Any],
                                  folders: dict[str, Path], token_dir: Path | None, deadline_at: float | None,
                                  restart: str, init: bool) -> ContainerResult | None:
        """Run one container, restarting it per restartPolicy. None: the pod was finalised meanwhile."""
        restarts = 0
        while True:
            try:
                mounts = self._mounts(c, folders)
                term_file = run.dir / f"termination-{c['name']}-{restarts}"
                term_file.write_text("")
                env = self._container_env(pod, c, mounts, token_dir, term_file)
                argv = self._argv(c, env, mounts)
            except PodConfigError as e:
                if self._config_wait(run, pod, c, str(e)):
                    return None
                continue
            res = self._exec(run, pod, c, argv, env, mounts, term_file, deadline_at, restarts, init)
            retry = (restart == "Always" or (restart == "OnFailure" and res.exit_code != 0))
            if (not retry or run.delete_requested.is_set() or self._stop.is_set()
                    or res.reason == "DeadlineExceeded"):
                res.restart_count = restarts
                return res
            restarts += 1
            backoff = min(10.0, 2.0 ** (restarts - 1))
            log(f"pod {run.namespace}/{run.name}: container {c['name']} exited {res.exit_code}; "
                f"restart #{restarts} in {backoff:.0f}s")
            if run.delete_requested.wait(backoff):
                res.restart_count = restarts
                return res

    def _exec(self, run: PodRun, pod: dict[str, Any], c: dict[str, Any], argv: list[str], env: dict[str, str],
              mounts: Mapping[str, str], term_file: Path, deadline_at: float | None, restarts: int,
              init: bool) -> ContainerResult:
        cwd = rewrite_path(c["workingDir"], mounts) if c.get("workingDir") else str(run.dir / "cwd")
        Path(cwd).mkdir(parents=True, exist_ok=True)
        limit = (c.get("resources") or {}).get("limits", {}).get("memory")
        mem_limit = parse_quantity(limit) if limit else None
        with open(run.log_path, "ab") as lf:
            log_offset = lf.tell()
            oom_before = _oom_kills()
            try:
                proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=lf,
                                        stderr=subprocess.STDOUT, preexec_fn=_child_setup)
            except OSError as e:  # command not found etc.: like a runtime's StartError
                lf.write(f"podrunner: cannot start {argv[:1]}: {e}\n".encode())
                t = now_iso()
                return ContainerResult(128, "StartError", str(e), t, t, "")
        run.proc = proc
        started = now_iso()
        cid = f"podrunner://{proc.pid}"
        if not init:
            run.phase = "Running"
            st = {"name": c["name"], "image": c.get("image", ""), "imageID": "", "containerID": cid, "ready": True,
                  "restartCount": restarts, "started": True, "state": {"running": {"startedAt": started}}}
            self._patch_status(pod, {"phase": "Running", "conditions": self._base_conditions(pod, True),
                                     "containerStatuses": [st]})
        log(f"pod {run.namespace}/{run.name}: started {c['name']} pid {proc.pid}: {' '.join(argv)[:200]}")
        oom = deadline_hit = killed_by_us = False
        term_sent_at: float | None = None
        grace = 0.0
        last_mem_check = 0.0
        while proc.poll() is None:
            run.delete_requested.wait(0.2)
            now = time.monotonic()
            if term_sent_at is None:
                why = None
                if run.delete_requested.is_set():
                    why, grace = "deleted", run.grace_seconds
                elif self._stop.is_set():
                    why, grace = "pod runner stopping", min(run.grace_seconds, self.stop_grace)
                elif deadline_at is not None and now >= deadline_at:
                    deadline_hit = True
                    why, grace = "activeDeadlineSeconds exceeded", run.grace_seconds
                if why:
                    log(f"pod {run.namespace}/{run.name}: {why}: SIGTERM, grace {grace:.0f}s")
                    try:
                        proc.send_signal(signal.SIGTERM)  # to the main process, like the kubelet
                    except ProcessLookupError:
                        pass
                    term_sent_at = now
            elif now - term_sent_at >= grace and not killed_by_us:
                killed_by_us = True
                _killpg(proc.pid, signal.SIGKILL)
            if mem_limit is not None and now - last_mem_check >= 0.5:
                last_mem_check = now
                if _tree_rss(proc.pid) > mem_limit:
                    oom = True
                    _killpg(proc.pid, signal.SIGKILL)
        _killpg(proc.pid, signal.SIGKILL)  # the container's other processes die with its main one
        finished = now_iso()
        code = exit_code_of(proc.returncode)
        if proc.returncode == -signal.SIGKILL and not killed_by_us and not oom and _oom_kills() > oom_before:
            oom = True  # the kernel OOM killer
        reason = termination_reason(code, oom, deadline_hit)
        file_text = term_file.read_text(errors="replace") if term_file.exists() else ""
        log_text = ""
        if c.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            with open(run.log_path, "rb") as f:
                f.seek(max(log_offset, f.seek(0, 2) - 64 * 1024))
                log_text = f.read().decode(errors="replace")
        message = termination_message(file_text, log_text, code, c.get("terminationMessagePolicy", "File"))
        log(f"pod {run.namespace}/{run.name}: {c['name']} exited {code} ({reason})")
        return ContainerResult(code, reason, message, started, finished, cid, restarts)

    def _terminal(self, run: PodRun, pod: dict[str, Any], phase: str,
                  results: list[tuple[dict[str, Any], ContainerResult]], *, message: str | None = None,
                  reason: str | None = None, init_results: Mapping[str, ContainerResult] | None = None) -> None:
        def status_of(c: dict[str, Any], r: ContainerResult) -> dict[str, Any]:
            term = {"exitCode": r.exit_code, "reason": r.reason, "startedAt": r.started_at,
                    "finishedAt": r.finished_at, "containerID": r.container_id}
            if r.message:
                term["message"] = r.message
            return {"name": c["name"], "image": c.get("image", ""), "imageID": "", "containerID": r.container_id,
                    "ready": False, "restartCount": r.restart_count, "started": False,
                    "state": {"terminated": term}}

        status: dict[str, Any] = {"phase": phase, "conditions": self._base_conditions(pod, False, "PodCompleted")}
        if results:
            status["containerStatuses"] = [status_of(c, r) for c, r in results]
            run.result = results[0][1]
        if init_results:
            inits = {c["name"]: c for c in pod["spec"].get("initContainers") or []}
            status["initContainerStatuses"] = [status_of(inits[n], r) for n, r in init_results.items()]
        if message:
            status["message"] = message
        if reason:
            status["reason"] = reason
        self._patch_status(pod, status)
        run.phase = phase

    # -- node heartbeat --------------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.heartbeat()
            except Exception as e:  # noqa: BLE001
                log(f"heartbeat failed: {e}")
            self._stop.wait(self.heartbeat_seconds)

    def heartbeat(self) -> None:
        """Refresh the node's Ready condition (lastHeartbeatTime) and its Lease."""
        node = self.kube.request("GET", f"/api/v1/nodes/{self.node}")
        now = now_iso()
        conds = node.get("status", {}).get("conditions") or []
        ready = next((c for c in conds if c.get("type") == "Ready"), None)
        new = {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubetune pod runner",
               "lastHeartbeatTime": now,
               "lastTransitionTime": ready["lastTransitionTime"] if ready and ready.get("status") == "True" else now}
        self.kube.request("PATCH", f"/api/v1/nodes/{self.node}/status", {"status": {"conditions": [new]}},
                          content_type="application/strategic-merge-patch+json")
        micro = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        lease_path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node}"
        spec = {"holderIdentity": self.node, "leaseDurationSeconds": 40, "renewTime": micro}
        if self.kube.request("GET", lease_path, ok404=True) is None:
            self.kube.request("POST", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                              {"metadata": {"name": self.node, "namespace": "kube-node-lease"}, "spec": spec})
        else:
            self.kube.request("PATCH", lease_path, {"spec": spec}, content_type="application/merge-patch+json")


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def _echo_logs(runner: PodRunner, stop: threading.Event) -> None:
    """Print new lines of every pod log, prefixed with the pod name (--echo)."""
    offsets: dict[Path, int] = {}
    while not stop.wait(0.5):
        with runner._lock:
            runs = list(runner.runs.values())
        for run in runs:
            if not run.log_path.exists():
                continue
            with open(run.log_path, "rb") as f:
                f.seek(offsets.get(run.log_path, 0))
                data = f.read()
                offsets[run.log_path] = f.tell()
            for line in data.decode(errors="replace").splitlines():
                print(f"{run.namespace}/{run.name}| {line}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run the pods of one node as local processes (test/demo only).")
    ap.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"), help="admin kubeconfig")
    ap.add_argument("--node", default="runner-node")
    ap.add_argument("--workdir", help="where pod folders go (default: a temp dir)")
    ap.add_argument("--log-dir", help="where pod logs go (default: <workdir>/logs)")
    ap.add_argument("--env", action="append", default=[], metavar="K=V", help="extra env for every container")
    ap.add_argument("--echo", action="store_true", help="also print pod logs to stdout")
    args = ap.parse_args(argv)
    if not args.kubeconfig:
        ap.error("--kubeconfig (or KUBECONFIG) is required")
    extra = dict(kv.split("=", 1) for kv in args.env)
    runner = PodRunner(args.kubeconfig, node=args.node, workdir=args.workdir, log_dir=args.log_dir, extra_env=extra)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    runner.start()
    echo: threading.Thread | None = None
    if args.echo:
        echo = threading.Thread(target=_echo_logs, args=(runner, stop), daemon=True)
        echo.start()
    stop.wait()
    log("stopping")
    runner.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
