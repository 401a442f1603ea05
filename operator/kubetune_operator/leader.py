"""Leader election with a coordination.k8s.io Lease, as controller-runtime does it.

Only the replica holding the Lease runs kopf; the others wait (standby). The holder renews the
Lease every ``renew`` seconds; if it cannot renew within ``duration`` seconds it has lost the
lease and must stop at once (the CLI exits non-zero and Kubernetes restarts it as a standby).
A standby takes over once the Lease has not been renewed for ``duration`` seconds.

Pure decision logic is in :func:`can_acquire`; :class:`LeaderElector` does the API calls.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable
from typing import Any

from kubetune_operator.kube import ApiError, Kube

log = logging.getLogger("kubetune.leader")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _fmt(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def can_acquire(lease: dict[str, Any] | None, identity: str, now: dt.datetime) -> bool:
    """Free, ours, or expired (not renewed within its leaseDurationSeconds)."""
    if lease is None:
        return True
    spec = lease.get("spec") or {}
    holder = spec.get("holderIdentity")
    if not holder or holder == identity:
        return True
    renewed = _parse(spec.get("renewTime")) or _parse(spec.get("acquireTime"))
    duration = int(spec.get("leaseDurationSeconds") or 15)
    return renewed is None or now - renewed > dt.timedelta(seconds=duration)


class LeaderElector:
    def __init__(self, kube: Kube, namespace: str, name: str, identity: str, duration: int = 15,
                 renew: float = 5.0) -> None:
        self.kube, self.namespace, self.name, self.identity = kube, namespace, name, identity
        self.duration, self.renew = duration, renew
        self._stop = threading.Event()

    def stop(self) -> None:
        """Stop waiting for (or renewing) the Lease."""
        self._stop.set()

    def _body(self, lease: dict[str, Any] | None, now: dt.datetime) -> dict[str, Any]:
        spec = dict((lease or {}).get("spec") or {})
        if spec.get("holderIdentity") != self.identity:
            spec["acquireTime"] = _fmt(now)
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (1 if lease else 0)
        spec.update(holderIdentity=self.identity, leaseDurationSeconds=self.duration, renewTime=_fmt(now))
        meta = {"name": self.name, "namespace": self.namespace}
        if lease is not None:
            meta["resourceVersion"] = lease["metadata"]["resourceVersion"]  # optimistic concurrency
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": spec}

    def try_acquire(self) -> bool:
        """One attempt to take or renew the Lease. Conflicts (another replica won) -> False."""
        now = _now()
        lease = self.kube.get("Lease", self.namespace, self.name)
        if not can_acquire(lease, self.identity, now):
            return False
        body = self._body(lease, now)
        try:
            if lease is None:
                self.kube.request("POST", Kube.path("Lease", self.namespace), body)
            else:
                self.kube.put(body)
        except ApiError as err:
            if err.status == 409:
                return False
            raise
        return True

    def acquire(self, on_wait: Callable[[], None] | None = None) -> bool:
        """Block until leader (True) or stopped (False)."""
        announced = False
        while not self._stop.is_set():
            try:
                if self.try_acquire():
                    log.info("acquired leader lease %s/%s as %s", self.namespace, self.name, self.identity)
                    return True
            except (ApiError, OSError) as err:
                log.warning("leader election: %s", err)
            if not announced:
                log.info("standby: another replica holds lease %s/%s", self.namespace, self.name)
                announced = True
                if on_wait:
                    on_wait()
            self._stop.wait(self.renew)
        return False

    def keep(self, on_lost: Callable[[], None]) -> threading.Thread:
        """Renew in a daemon thread; call ``on_lost`` once if renewal fails for ``duration`` seconds."""

        def loop() -> None:
            last = _now()
            while not self._stop.wait(self.renew):
                try:
                    if self.try_acquire():
                        last = _now()
                        continue
                except (ApiError, OSError) as err:
                    log.warning("lease renewal failed: %s", err)
                if (_now() - last).total_seconds() > self.duration:
                    log.error("lost leader lease %s/%s", self.namespace, self.name)
                    on_lost()
                    return

        thread = threading.Thread(target=loop, name="leader-lease", daemon=True)
        thread.start()
        return thread

    def release(self) -> None:
        """Stop renewing and hand the Lease over at once (empty holder) on a graceful shutdown."""
        self._stop.set()
        try:
            lease = self.kube.get("Lease", self.namespace, self.name)
            if lease and (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                lease["spec"]["holderIdentity"] = None
                self.kube.put(lease)
        except (ApiError, OSError) as err:
            log.warning("could not release the lease: %s", err)
