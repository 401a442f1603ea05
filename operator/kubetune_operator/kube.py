"""A small synchronous JSON client for the Kubernetes API: dicts in, dicts out.

Credentials come from the ``kubernetes`` package's loaders (in-cluster ServiceAccount, else
``$KUBECONFIG``/``~/.kube/config``); requests go through urllib3. Only what the operator needs:
get, list (label selector), create, merge-patch (object or status subresource).

Writes can be *fenced* (leader election, leader.py): with a ``write_guard`` that refuses, or after
``fence()``, every POST/PUT/PATCH/DELETE raises :class:`Fenced` before anything is sent. A
``timeout`` bounds one request as a whole (one attempt, no retries): a caller with a deadline.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlencode

import urllib3

from kubetune import api
from kubetune_operator import metrics

# kind -> (group/version path prefix, plural)
RESOURCES: dict[str, tuple[str, str]] = {
    "ConfigMap": ("/api/v1", "configmaps"),
    "Secret": ("/api/v1", "secrets"),
    "Pod": ("/api/v1", "pods"),
    "Node": ("/api/v1", "nodes"),
    "ServiceAccount": ("/api/v1", "serviceaccounts"),
    "Service": ("/api/v1", "services"),
    "Job": ("/apis/batch/v1", "jobs"),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
    "FineTuneJob": (f"/apis/{api.API_VERSION}", "finetunejobs"),
    "MergeJob": (f"/apis/{api.API_VERSION}", "mergejobs"),
    "Lease": ("/apis/coordination.k8s.io/v1", "leases"),
    "Workload": ("/apis/kueue.x-k8s.io/v1beta2", "workloads"),  # Kueue >= 0.15 (kubetune_operator.kueue)
}


class ApiError(Exception):
    """A non-2xx answer from the API server."""

    def __init__(self, status: int, method: str, path: str, body: str) -> None:
        self.status = status
        try:
            self.reason = json.loads(body).get("reason", "")
            detail = json.loads(body).get("message", body)
        except ValueError:
            self.reason, detail = "", body
        super().__init__(f"{method} {path}: HTTP {status}: {detail[:500]}")


MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
WRITE_CONNECT_RETRIES = 3  # a write whose connection failed was not sent: try again (fence checked each time)


class Fenced(RuntimeError):
    """A write refused without being sent: this replica is not (or may no longer be) the leader."""


class Kube:
    """The API client. ``Kube.from_environment()`` loads credentials like kubectl does."""

    def __init__(self, configuration: Any, user_agent: str = "kubetune-operator") -> None:
        self._cfg = configuration
        self._lock = threading.Lock()
        self.user_agent = user_agent  # with the replica's identity: the audit log tells replicas apart
        self.write_guard: Callable[[], str | None] | None = None  # a reason to refuse writes, or None
        self._fenced: str | None = None
        kwargs: dict[str, Any] = {"maxsize": 32, "timeout": urllib3.Timeout(connect=10, read=60),
                                  "retries": urllib3.Retry(total=3, connect=3, read=0, status=0, backoff_factor=0.5)}
        if configuration.host.startswith("https"):
            kwargs["cert_reqs"] = "CERT_REQUIRED" if configuration.verify_ssl else "CERT_NONE"
            if configuration.ssl_ca_cert:
                kwargs["ca_certs"] = configuration.ssl_ca_cert
            if configuration.cert_file:
                kwargs["cert_file"] = configuration.cert_file
                kwargs["key_file"] = configuration.key_file
        self._http = urllib3.PoolManager(**kwargs)

    @classmethod
    def from_environment(cls, user_agent: str = "kubetune-operator") -> Kube:
        from kubernetes import client, config

        cfg = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=cfg)
        except config.ConfigException:
            config.load_kube_config(client_configuration=cfg)
        return cls(cfg, user_agent)

    # -- plumbing

    def _headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": self.user_agent}
        if content_type:
            headers["Content-Type"] = content_type
        with self._lock:  # the token may be refreshed (projected ServiceAccount tokens rotate)
            token = self._cfg.get_api_key_with_prefix("authorization") or self._cfg.get_api_key_with_prefix(
                "BearerToken")
        if token:
            headers["Authorization"] = token if token.lower().startswith("bearer ") else f"Bearer {token}"
        return headers

    # -- fencing

    def fence(self, reason: str) -> None:
        """Refuse every write from now on (this replica lost, or is giving up, the leader lease)."""
        self._fenced = self._fenced or reason

    def write_refusal(self) -> str | None:
        """Why a write would be refused now, or None."""
        return self._fenced or (self.write_guard() if self.write_guard is not None else None)

    def check_write(self, method: str, what: str) -> None:
        """Raise :class:`Fenced` if ``method`` is a write and writes are refused now."""
        if method.upper() in MUTATING and (reason := self.write_refusal()):
            raise Fenced(f"{method} {what} not sent: {reason}")

    def request(self, method: str, path: str, body: Any = None, content_type: str | None = None,
                query: dict[str, str] | None = None, timeout: float | None = None) -> dict[str, Any]:
        """One API call. ``timeout``: seconds for the whole request, in one attempt (no retries)."""
        url = self._cfg.host.rstrip("/") + path + (f"?{urlencode(query)}" if query else "")
        data = json.dumps(body).encode() if body is not None else None
        headers = self._headers(content_type or ("application/json" if data else None))
        try:
            resp = self._send(method, path, url, data, headers, timeout)
        except Exception:
            metrics.REST_REQUESTS.labels("<error>", method.upper(), self._cfg.host).inc()
            raise
        metrics.REST_REQUESTS.labels(str(resp.status), method.upper(), self._cfg.host).inc()
        text = resp.data.decode(errors="replace")
        if resp.status >= 300:
            raise ApiError(resp.status, method, path, text)
        return json.loads(text) if text else {}

    def _send(self, method: str, path: str, url: str, data: bytes | None, headers: dict[str, str],
              timeout: float | None) -> Any:
        if timeout is not None:
            if timeout <= 0:
                raise TimeoutError(f"{method} {path} not sent: no time left")
            self.check_write(method, path)
            return self._http.request(method, url, body=data, headers=headers, retries=False,
                                      timeout=urllib3.Timeout(total=timeout))
        if method.upper() not in MUTATING:
            return self._http.request(method, url, body=data, headers=headers)
        # A write: the fence is asked before every attempt, so a connect retry that comes late (after
        # a freeze or a long backoff) cannot send a write this replica is no longer entitled to.
        attempt = 0
        while True:
            self.check_write(method, path)
            try:
                return self._http.request(method, url, body=data, headers=headers,
                                          retries=urllib3.Retry(total=0, read=0, status=0, redirect=False))
            except urllib3.exceptions.MaxRetryError as err:  # urllib3 names a failed connect ConnectTimeoutError
                unsent = isinstance(err.reason, urllib3.exceptions.ConnectTimeoutError)
                if attempt == WRITE_CONNECT_RETRIES or not unsent:
                    raise
            time.sleep(0.5 * 2 ** attempt)
            attempt += 1

    @staticmethod
    def path(kind: str, namespace: str | None, name: str | None = None, sub: str | None = None) -> str:
        prefix, plural = RESOURCES[kind]
        out = prefix + (f"/namespaces/{quote(namespace)}" if namespace else "") + f"/{plural}"
        if name:
            out += f"/{quote(name)}"
        if sub:
            out += f"/{sub}"
        return out

    # -- verbs

    def get(self, kind: str, namespace: str, name: str, timeout: float | None = None) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return self.request("GET", self.path(kind, namespace, name), timeout=timeout)
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    def list(self, kind: str, namespace: str, selector: str | None = None) -> list[dict[str, Any]]:
        query = {"labelSelector": selector} if selector else None
        return list(self.request("GET", self.path(kind, namespace), query=query).get("items") or [])

    def create(self, obj: dict[str, Any], read_existing: bool = True) -> tuple[dict[str, Any], bool]:
        """Create; on HTTP 409 (already exists) read and return the existing one (or ``obj`` itself
        when ``read_existing`` is False: no ``get`` permission needed). -> (object, created)."""
        meta = obj["metadata"]
        try:
            return self.request("POST", self.path(obj["kind"], meta["namespace"]), obj), True
        except ApiError as err:
            if err.status != 409:
                raise
        if not read_existing:
            return obj, False
        existing = self.get(obj["kind"], meta["namespace"], meta["name"])
        if existing is None:  # deleted in between: let the next reconcile create it
            raise ApiError(409, "POST", self.path(obj["kind"], meta["namespace"]), "conflict, then gone")
        return existing, False

    def patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any],
              subresource: str | None = None) -> dict[str, Any]:
        """JSON merge patch (RFC 7386) of the object or of a subresource (``status``)."""
        return self.request("PATCH", self.path(kind, namespace, name, subresource), patch,
                            content_type="application/merge-patch+json")

    def put(self, obj: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        meta = obj["metadata"]
        return self.request("PUT", self.path(obj["kind"], meta["namespace"], meta["name"]), obj, timeout=timeout)
