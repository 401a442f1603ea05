"""What every kubetune container does around its recipe: read the spec, report status, exit clearly.

* :func:`load_spec` validates the mounted spec with the shared API models.
* :class:`StatusReporter` is the progress channel: it patches the resource's ``/status`` with
  the pod's own ServiceAccount token. The operator gives each job a ServiceAccount whose Role
  allows ``patch`` on that one resource's status only (``resourceNames``), so a compromised
  trainer can touch nothing else. The pod writes ``stage`` (what it is doing now), ``progress`` and
  its results there (:data:`POD_FIELDS`); ``phase``, ``message`` and the rest belong to the operator
  (the chart's ValidatingAdmissionPolicy refuses them from any ServiceAccount but the operator's).
  The reporter never raises: training goes on if it fails.
* The uid guard. Given the resource's uid (``KUBETUNE_UID``), every patch is a JSON patch whose first
  operation tests ``/metadata/uid``, so it applies atomically to that very resource only: a patch
  that reaches a namesake re-created after its deletion is refused (HTTP 422). (A merge patch cannot
  carry the guard: the status subresource ignores ``metadata`` in the patch.) On a 422 the reporter
  reads the resource once: another uid means this pod works for a resource that no longer exists,
  so it logs that once and stops reporting for good; the same uid without a status (the operator
  has not written its first one) is answered by one patch that adds the whole status, guarded by
  the uid and the resourceVersion just read. Without a uid (a local run) it merge-patches.
* Two ways through the channel. ``stage``, ``checkpointUri`` and the final result are rare and go
  out synchronously with :meth:`StatusReporter.patch` (each waits at most ``timeout``, 10 s, per
  request). ``progress`` is frequent (every logging step) and goes through a
  :class:`ProgressSender`: a background thread that sends at most one patch every ``interval``
  seconds (5 s), always the newest pending progress (older ones are dropped, never queued), so
  training never waits on the API server and a job writes to it at a bounded rate. ``flush``
  sends what is pending at once and waits a bounded time: the trainer's callback calls it at the
  end of training, so the last progress the API server sees is the final one. Requests never
  overlap (one lock per reporter), so a late progress patch cannot land after a later one.
* :func:`run_entry` maps failures to exit codes (:mod:`kubetune.contract`) and writes the
  termination message the operator reads when the pod ends, so results arrive without the channel.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from kubetune import contract
from kubetune.api import GROUP, STAGE_MAX_LENGTH, VERSION

log = logging.getLogger("kubetune")

SpecT = TypeVar("SpecT", bound=BaseModel)


class KubetuneError(Exception):
    """A failure the operator can name. Subclasses set the exit code and condition reason."""

    exit_code = contract.EXIT_CRASH
    reason = "Error"


class InvalidSpec(KubetuneError):
    exit_code = contract.EXIT_INVALID_SPEC
    reason = "InvalidSpec"


class InvalidDataset(KubetuneError):
    exit_code = contract.EXIT_INVALID_DATASET
    reason = "InvalidDataset"


class StorageError(KubetuneError):
    exit_code = contract.EXIT_STORAGE
    reason = "StorageError"


class NotFound(StorageError):
    """Storage answered that the bucket (or object) does not exist: not a transient fault. The
    caller that knows whose input it is turns it into a permanent failure (a missing model is an
    InvalidSpec, a missing dataset an InvalidDataset)."""


class InvalidAdapter(KubetuneError):
    exit_code = contract.EXIT_INVALID_ADAPTER
    reason = "InvalidAdapter"


class VerificationFailed(KubetuneError):
    exit_code = contract.EXIT_VERIFICATION_FAILED
    reason = "VerificationFailed"


class InsufficientGPUMemory(KubetuneError):
    """The run's estimated peak memory exceeds its GPUs' (kubetune_trainer.memory): permanent."""

    exit_code = contract.EXIT_INSUFFICIENT_GPU_MEMORY
    reason = "InsufficientGPUMemory"


class Preempted(KubetuneError):
    exit_code = contract.EXIT_PREEMPTED
    reason = "Preempted"


def load_spec(source: str, model: type[SpecT]) -> SpecT:
    """Read a spec (JSON or YAML; a whole manifest or a bare spec) from a path or ``-`` (stdin)."""
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except OSError as err:
        raise InvalidSpec(f"cannot read the spec {source}: {err.strerror}") from err
    try:
        doc = yaml.safe_load(text)  # YAML is a superset of JSON
    except yaml.YAMLError as err:
        raise InvalidSpec(f"the spec {source} is not valid YAML/JSON: {err}") from err
    if not isinstance(doc, dict):
        raise InvalidSpec(f"the spec {source} must be a mapping, got {type(doc).__name__}")
    if "spec" in doc and "kind" in doc:
        doc = doc["spec"]
    try:
        return model.model_validate(doc)
    except ValidationError as err:
        raise InvalidSpec(f"invalid {model.__name__}: {err}") from err


class StatusReporter:
    """Patches ``<kind>/<name>/status`` through the API server with the pod's own token (uid-guarded)."""

    PLURALS = {"FineTuneJob": "finetunejobs", "MergeJob": "mergejobs"}

    def __init__(self, server: str | None, token_file: Path | None, ca_file: Path | None,
                 kind: str | None, name: str | None, namespace: str | None, timeout: float = 10.0,
                 uid: str | None = None):
        self.server, self.token_file, self.ca_file = server, token_file, ca_file
        self.kind, self.name, self.namespace, self.timeout = kind, name, namespace, timeout
        self.uid = uid or None
        self.enabled = bool(server and token_file and kind in self.PLURALS and name and namespace)
        self.stopped: str | None = None  # why reporting stopped for good (the resource is not this pod's)
        self._warned = False
        self.failures = 0
        self._lock = threading.Lock()  # one request at a time: patches land in the order they were sent

    @classmethod
    def from_env(cls, env: Any = os.environ) -> StatusReporter:
        sa_dir = Path(env.get(contract.ENV_SA_DIR, contract.DEFAULT_SA_DIR))
        server = env.get(contract.ENV_API_SERVER)
        if not server and env.get("KUBERNETES_SERVICE_HOST"):
            host = env["KUBERNETES_SERVICE_HOST"]
            host = f"[{host}]" if ":" in host else host
            server = f"https://{host}:{env.get('KUBERNETES_SERVICE_PORT', '443')}"
        token = sa_dir / "token"
        ca = sa_dir / "ca.crt"
        return cls(
            server=server,
            token_file=token if token.exists() else None,
            ca_file=ca if ca.exists() else None,
            kind=env.get(contract.ENV_KIND),
            name=env.get(contract.ENV_NAME),
            namespace=env.get(contract.ENV_NAMESPACE) or _read(sa_dir / "namespace"),
            uid=env.get(contract.ENV_UID),
        )

    def url(self) -> str:
        plural = self.PLURALS[self.kind or ""]
        return f"{self.server}/apis/{GROUP}/{VERSION}/namespaces/{self.namespace}/{plural}/{self.name}/status"

    def patch(self, status: dict[str, Any]) -> bool:
        """Write a camelCase status fragment: each top-level key it names is set (replaced whole, as
        every caller sends whole values), the others are left alone. Never raises; returns whether
        it landed (False for good once the resource turned out to be a re-created namesake).

        Synchronous: it waits for the API server (at most ``timeout``, plus a request already in
        flight from the :class:`ProgressSender`). Progress goes through a ``ProgressSender`` instead."""
        if not self.enabled:
            return False
        with self._lock:
            return self._send(status)

    def _send(self, status: dict[str, Any]) -> bool:
        try:
            if self.uid is None:
                self._call("PATCH", {"status": bounded(status)}, MERGE_PATCH)
                return True
            return self._send_guarded(bounded(status))
        except (OSError, urllib.error.URLError, ValueError) as err:
            self.failures += 1
            if not self._warned:
                detail = err.text[:300] if isinstance(err, _HttpError) else ""
                log.warning("status channel failed (training goes on; results still reach the operator "
                            "through the termination message): %s %s", err, detail)
                self._warned = True
            return False

    def _send_guarded(self, status: dict[str, Any]) -> bool:
        """A JSON patch that applies only to the resource with ``self.uid`` (see the module docstring)."""
        fields = {k: v for k, v in status.items() if v is not None}  # a JSON patch cannot "merge" a null
        guard = {"op": "test", "path": "/metadata/uid", "value": self.uid}
        try:
            self._call("PATCH", [guard, *({"op": "add", "path": f"/status/{_pointer(k)}", "value": v}
                                          for k, v in fields.items())], JSON_PATCH)
            return True
        except _HttpError as err:
            if err.code != 422:  # 422: the patch did not apply (or the values are invalid): look why
                raise
            refused = err
        current = self._call("GET")  # get on its own status is in the pod's Role
        meta = current.get("metadata") or {}
        if meta.get("uid") != self.uid:
            self._stop(f"{self.kind} {self.namespace}/{self.name} is now another resource (uid "
                       f"{meta.get('uid')}, this pod's was {self.uid}): the one this pod works for was deleted")
            return False
        if "status" in current:
            raise refused  # the values themselves were refused
        unchanged = {"op": "test", "path": "/metadata/resourceVersion", "value": meta.get("resourceVersion")}
        self._call("PATCH", [guard, unchanged, {"op": "add", "path": "/status", "value": fields}], JSON_PATCH)
        return True

    def _stop(self, why: str) -> None:
        self.enabled, self.stopped = False, why
        self.failures += 1
        log.warning("status channel stopped for good (training goes on): %s", why)

    def _call(self, method: str, body: Any = None, content_type: str | None = None) -> dict[str, Any]:
        """One request to ``url()`` with the pod's token; the parsed answer. Raises :class:`_HttpError`
        (an OSError) on an HTTP error status."""
        token = Path(self.token_file or "").read_text().strip()  # re-read: projected tokens rotate
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json",
                   # who wrote, in the API server's audit log: the trainer, and which torchrun rank
                   "User-Agent": f"kubetune-trainer (rank {os.environ.get('RANK', '0')})"}
        if content_type:
            headers["Content-Type"] = content_type
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url(), data=data, method=method, headers=headers)
        context = ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file else None
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=context) as resp:
                text = resp.read()
        except urllib.error.HTTPError as err:
            raise _HttpError(err.code, err.read().decode(errors="replace"), f"{method} {err}") from None
        answer = json.loads(text) if text else {}
        return answer if isinstance(answer, dict) else {}


MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
POD_FIELDS = {
    "FineTuneJob": ("stage", "progress", "data", "memory", "checkpointUri", "adapterUri", "reportUri", "wandbUrl"),
    "MergeJob": ("stage", "mergedUri", "adapterUri", "verification", "samples"),
}
"""The status fields a pod writes (the chart's progress-channel policy allows exactly these from a pod)."""


class _HttpError(OSError):
    """An HTTP error answer from the API server: its code and body."""

    def __init__(self, code: int, text: str, what: str):
        super().__init__(what)
        self.code, self.text = code, text


def _pointer(key: str) -> str:
    """``key`` as one JSON-pointer token (RFC 6901)."""
    return key.replace("~", "~0").replace("/", "~1")


PROGRESS_INTERVAL_S = 5.0
"""At most one progress patch per this many seconds per job."""
FLUSH_TIMEOUT_S = 10.0
"""How long the end of training waits for the final progress to reach the API server."""


class ProgressSender:
    """Sends status fragments from a background thread: throttled, coalesced, never blocking.

    :meth:`submit` only stores the fragment and returns. A worker thread sends it with ``send``
    (usually :meth:`StatusReporter.patch`) at once if the previous send started ``interval`` seconds
    ago or more, otherwise when that interval is over. Whatever arrives meanwhile replaces the pending
    fragment: the newest wins, nothing queues up. The worker ends when nothing is pending and is
    started again by the next ``submit``, so an idle sender holds no thread.
    """

    def __init__(self, send: Callable[[dict[str, Any]], Any], interval: float = PROGRESS_INTERVAL_S):
        self.send, self.interval = send, interval
        self._cond = threading.Condition()
        self._pending: dict[str, Any] | None = None
        self._running = False  # a worker thread exists
        self._busy = False  # ``send`` is running
        self._urgent = 0  # flushes waiting: send now, regardless of the interval
        self._last_start = float("-inf")

    def submit(self, status: dict[str, Any]) -> None:
        """Make ``status`` the next fragment to send; returns at once."""
        with self._cond:
            self._pending = status
            if not self._running:
                self._running = True
                threading.Thread(target=self._work, name="kubetune-progress", daemon=True).start()
            self._cond.notify_all()

    def flush(self, timeout: float = FLUSH_TIMEOUT_S) -> bool:
        """Send the pending fragment now and wait until it is sent, for at most ``timeout`` seconds.

        Returns whether everything submitted so far has been handed over. On a timeout the pending
        fragment stays pending and goes out as soon as the request in flight ends."""
        with self._cond:
            self._urgent += 1
            self._cond.notify_all()
            try:
                return self._cond.wait_for(lambda: self._pending is None and not self._busy, timeout)
            finally:
                self._urgent -= 1

    close = flush  # nothing else to release: the worker ends by itself once nothing is pending

    def _work(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._pending is None:
                        self._running = False
                        self._cond.notify_all()
                        return
                    wait = self._last_start + self.interval - time.monotonic()
                    if wait <= 0 or self._urgent:
                        break
                    self._cond.wait(wait)
                status, self._pending = self._pending, None
                self._busy, self._last_start = True, time.monotonic()
            try:
                self.send(status)
            except Exception as err:  # noqa: BLE001 - a broken channel must never kill the worker
                log.warning("status channel failed: %s", err)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()


def bounded(status: dict[str, Any]) -> dict[str, Any]:
    """``status`` with its ``stage`` cut to the CRD's maxLength: stages name URIs of any length, and the
    API server would reject the whole patch (progress included) for one character too many."""
    stage = status.get("stage")
    if not isinstance(stage, str) or len(stage) <= STAGE_MAX_LENGTH:
        return status
    return {**status, "stage": stage[: STAGE_MAX_LENGTH - 3] + "..."}


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


@dataclass
class PodContext:
    """Where a container runs: its resource, scratch space, progress channel and termination file."""

    kind: str
    name: str | None
    namespace: str | None
    work_dir: Path
    reporter: StatusReporter
    termination_log: Path

    @classmethod
    def from_env(cls, kind: str, env: Any = os.environ) -> PodContext:
        work = Path(env.get(contract.ENV_WORK_DIR) or Path.cwd() / ".kubetune-work")
        work.mkdir(parents=True, exist_ok=True)
        return cls(
            kind=kind,
            name=env.get(contract.ENV_NAME),
            namespace=env.get(contract.ENV_NAMESPACE),
            work_dir=work,
            reporter=StatusReporter.from_env(env),
            termination_log=Path(env.get(contract.ENV_TERMINATION_LOG, contract.DEFAULT_TERMINATION_LOG)),
        )


def _json_size(doc: Any) -> int:
    return len(json.dumps(doc, separators=(",", ":")).encode())


# (prompt, output) character budgets per sample, tried in turn until the result fits
SAMPLE_CUTS = ((400, 2000), (200, 600), (120, 300), (80, 160), (60, 60), (40, 0))


def fit_result(result: dict[str, Any], budget: int) -> dict[str, Any]:
    """``result`` with its ``samples`` shortened evenly (outputs first, then prompts, at last fewer
    samples) until its compact JSON fits ``budget`` bytes; as is when it fits or has no samples.

    Results that carry generations (the MergeJob's) must fit the 4096-byte termination message."""
    samples = result.get("samples") or []
    if _json_size(result) <= budget or not samples:
        return result
    for keep_prompt, keep_output in SAMPLE_CUTS:
        short = [{"prompt": _cut(s.get("prompt", ""), keep_prompt), "output": _cut(s.get("output", ""), keep_output)}
                 for s in samples]
        if _json_size({**result, "samples": short}) <= budget:
            return {**result, "samples": short}
    return {**result, "samples": short[: max(1, len(short) // 4)]}


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: max(0, n - 1)] + "…"


def write_termination_message(path: Path, reason: str, message: str, result: dict[str, Any]) -> None:
    """Write the JSON the operator reads from the pod status; shortened to fit 4096 bytes (samples
    first, with :func:`fit_result`; then only short string fields; then the message alone)."""
    doc: dict[str, Any] = {"reason": reason, "message": message, "result": result}
    text = json.dumps(doc, separators=(",", ":"))
    limit = contract.TERMINATION_MESSAGE_LIMIT
    if len(text.encode()) > limit and result.get("samples"):
        envelope = _json_size({**doc, "result": {}}) - 2  # everything but the result's own bytes
        doc["result"] = fit_result(result, limit - envelope)
        text = json.dumps(doc, separators=(",", ":"))
    if len(text.encode()) > limit:
        doc = {"reason": reason, "message": message[:1500],
               "result": {k: v for k, v in result.items() if isinstance(v, str) and len(v) < 512}}
        text = json.dumps(doc, separators=(",", ":"))
    if len(text.encode()) > limit:
        text = json.dumps({"reason": reason, "message": message[:3000]})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as err:  # no termination-log mount (e.g. a local run): the log still has it
        log.debug("cannot write the termination message to %s: %s", path, err)


def run_entry(kind: str, fn: Callable[[PodContext], dict[str, Any]], ctx: PodContext | None = None) -> int:
    """Run a recipe, report its result or failure, and return the process exit code."""
    logging.basicConfig(level=os.environ.get("KUBETUNE_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx = ctx or PodContext.from_env(kind)
    started = time.monotonic()
    ctx.reporter.patch({"stage": "starting"})  # replaces a failed attempt's stage before this one reports
    try:
        result = fn(ctx)
    except KubetuneError as err:
        log.error("%s: %s", err.reason, err)
        write_termination_message(ctx.termination_log, err.reason, str(err), {})
        return err.exit_code
    except KeyboardInterrupt:
        write_termination_message(ctx.termination_log, "Interrupted", "interrupted", {})
        return 130
    except Exception as err:  # noqa: BLE001 - a crash: keep the traceback in the log
        traceback.print_exc()
        message = f"{type(err).__name__}: {err}"
        write_termination_message(ctx.termination_log, "Crashed", message, {})
        return contract.EXIT_CRASH
    ctx.reporter.patch({**result, "stage": "done"})
    seconds = time.monotonic() - started
    write_termination_message(ctx.termination_log, "Completed", f"{kind} finished in {seconds:.0f}s", result)
    return contract.EXIT_OK
