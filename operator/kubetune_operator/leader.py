"""Leader election with a coordination.k8s.io Lease: client-go's algorithm (tools/leaderelection).

Only the replica holding the Lease runs kopf; the others stand by. Three durations, with client-go's
defaults (:class:`Timing`):

* ``lease_duration`` (15 s): a standby takes over a Lease whose record it has seen *unchanged* for
  that long. This is client-go's "observed time": measured on the standby's own monotonic clock from
  the moment IT last saw the record change (holder, renewTime, resourceVersion). The holder's
  ``renewTime`` is never compared with the local clock, so clock skew between nodes cannot make a
  standby take over early.
* ``renew_deadline`` (10 s): the leader may act until ``renew_deadline`` after the *start* of its last
  successful renewal, on its own monotonic clock (:meth:`LeaderElector.write_refusal`, which the
  operator's :class:`~kubetune_operator.kube.Kube` consults before every write). Every request of a
  renewal is bounded by the time left before that deadline, so a hanging request cannot stretch it.
  Past the deadline the leader is fenced (no write leaves the process) and steps down.
* ``retry_period`` (2 s): how often the leader renews and a standby retries (with jitter).

A standby sees a renewal no earlier than the leader started it, so it acquires ``lease_duration``
after that start at the earliest, while the leader stopped writing ``renew_deadline`` after it: the
5 s between the two absorb clock-rate differences and a write already on the wire. The leader also
steps down as soon as it sees another holder in the Lease. A leader that lost the Lease never writes
it again (no release); a graceful stop releases it (empty holder) so a standby takes over at once.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import urllib3

from kubetune_operator.kube import ApiError, Kube

log = logging.getLogger("kubetune.leader")

JITTER = 1.2  # client-go's JitterFactor: a standby waits retry_period * (1 + JITTER * rand) between tries
ERRORS = (ApiError, OSError, urllib3.exceptions.HTTPError)  # a failed attempt (OSError includes TimeoutError)


def monotonic() -> float:
    """Seconds on a clock that never jumps and keeps counting while the machine is suspended."""
    if hasattr(time, "CLOCK_BOOTTIME"):
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    return time.monotonic()  # pragma: no cover - not Linux


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _fmt(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Timing:
    """Seconds; client-go's defaults and its consistency checks."""

    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if self.retry_period <= 0:
            raise ValueError("the retry period must be positive")
        if self.renew_deadline <= JITTER * self.retry_period:
            raise ValueError(f"the renew deadline must be longer than {JITTER} x the retry period")
        if self.lease_duration <= self.renew_deadline:
            raise ValueError("the lease duration must be longer than the renew deadline")


def can_acquire(lease: dict[str, Any] | None, identity: str, observed_at: float, now: float,
                default_duration: float = 15.0) -> bool:
    """Free, ours, or expired: held by another replica whose record this replica has seen unchanged
    since ``observed_at`` for at least its ``leaseDurationSeconds`` (both times on this replica's
    monotonic clock; the record's own timestamps are not used)."""
    if lease is None:
        return True
    spec = lease.get("spec") or {}
    holder = spec.get("holderIdentity")
    if not holder or holder == identity:
        return True
    duration = float(spec.get("leaseDurationSeconds") or default_duration)
    return now >= observed_at + duration


def _record(lease: dict[str, Any]) -> tuple[Any, ...]:
    spec = lease.get("spec") or {}
    return ((lease.get("metadata") or {}).get("resourceVersion"), spec.get("holderIdentity"),
            spec.get("renewTime"), spec.get("acquireTime"), spec.get("leaseTransitions"),
            spec.get("leaseDurationSeconds"))


class LeaderElector:
    """Acquire (:meth:`acquire`), keep (:meth:`keep`) and release (:meth:`release`) one Lease.

    ``kube`` should be a client of its own (its own connection pool, no write fence), so reconcile
    traffic cannot starve renewals. ``clock`` and ``wall`` are injectable for tests."""

    def __init__(self, kube: Kube, namespace: str, name: str, identity: str, timing: Timing | None = None,
                 clock: Callable[[], float] = monotonic, wall: Callable[[], dt.datetime] = _now,
                 rand: Callable[[], float] = random.random) -> None:
        self.kube, self.namespace, self.name, self.identity = kube, namespace, name, identity
        self.timing = timing or Timing()
        self.clock, self.wall, self.rand = clock, wall, rand
        self.lost: str | None = None  # why leadership was lost (then the Lease is never written again)
        self._leading = False
        self._valid_until = -math.inf  # the leader may write while clock() < this
        self._observed: tuple[Any, ...] | None = None  # the Lease record as last seen ...
        self._observed_at = 0.0  # ... and when it was first seen so (clock())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- state

    @property
    def leading(self) -> bool:
        return self.write_refusal() is None

    def write_refusal(self) -> str | None:
        """Why this replica must not write now; None while it leads within its renew deadline.
        The operator's Kube asks this before every POST/PUT/PATCH/DELETE (``Kube.write_guard``)."""
        if self.lost:
            return self.lost
        if not self._leading:
            return "not the leader"
        if self.clock() >= self._valid_until:
            return f"the Lease was not renewed within the {self.timing.renew_deadline:g} s renew deadline"
        return None

    def stop(self) -> None:
        """Stop waiting for (or renewing) the Lease."""
        self._stop.set()

    def _observe(self, lease: dict[str, Any]) -> None:
        record = _record(lease)
        if record != self._observed:
            self._observed, self._observed_at = record, self.clock()

    def _lose(self, reason: str) -> None:
        if self.lost is None:
            self.lost = reason
            log.error("lost the leader lease %s/%s: %s", self.namespace, self.name, reason)

    def _left(self, deadline: float) -> float:
        left = deadline - self.clock()
        if left <= 0:
            raise TimeoutError("no time left before the renew deadline")
        return left

    # -- one attempt (client-go's tryAcquireOrRenew)

    def _body(self, lease: dict[str, Any] | None) -> dict[str, Any]:
        now = _fmt(self.wall())
        spec = dict((lease or {}).get("spec") or {})
        if spec.get("holderIdentity") != self.identity:  # a takeover (or the first holder)
            spec["acquireTime"] = now
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (1 if lease else 0)
        spec.update(holderIdentity=self.identity, leaseDurationSeconds=math.ceil(self.timing.lease_duration),
                    renewTime=now)
        meta = {"name": self.name, "namespace": self.namespace}
        if lease is not None:
            meta["resourceVersion"] = lease["metadata"]["resourceVersion"]  # optimistic concurrency
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": spec}

    def try_acquire_or_renew(self) -> bool:
        """One attempt to take or renew the Lease; True when this replica holds it now.

        Every request is bounded by the time left before the renew deadline (the leader's current
        one, or a fresh one for a standby). A leader that finds another holder steps down at once
        (``lost``). API errors propagate (the loops log them and retry)."""
        if self.lost:
            return False
        start = self.clock()
        deadline = self._valid_until if self._leading else start + self.timing.renew_deadline
        lease = self.kube.get("Lease", self.namespace, self.name, timeout=self._left(deadline))
        if lease is not None:
            self._observe(lease)
            holder = (lease.get("spec") or {}).get("holderIdentity")
            if holder and holder != self.identity:
                if self._leading:
                    self._lose(f"the Lease is now held by {holder}")
                    return False
                if not can_acquire(lease, self.identity, self._observed_at, self.clock(), self.timing.lease_duration):
                    return False
        body = self._body(lease)
        try:
            if lease is None:
                written = self.kube.request("POST", Kube.path("Lease", self.namespace), body,
                                            timeout=self._left(deadline))
            else:
                written = self.kube.put(body, timeout=self._left(deadline))
        except ApiError as err:
            if err.status == 409:  # another replica wrote first: look again next round
                return False
            raise
        self._observe(written)
        if not self._leading:
            log.info("acquired leader lease %s/%s as %s (transitions: %s)", self.namespace, self.name,
                     self.identity, body["spec"].get("leaseTransitions", 0))
        self._leading, self._valid_until = True, start + self.timing.renew_deadline
        return True

    def _attempt(self) -> bool:
        try:
            return self.try_acquire_or_renew()
        except ERRORS as err:
            log.warning("leader election: %s", err)
            return False

    # -- the loops

    def acquire(self, on_wait: Callable[[], None] | None = None) -> bool:
        """Block until leader (True) or stopped (False)."""
        announced = False
        while not self._stop.is_set():
            if self._attempt():
                return True
            if not announced:
                log.info("standby: another replica holds lease %s/%s (this is %s)", self.namespace, self.name,
                         self.identity)
                announced = True
                if on_wait:
                    on_wait()
            self._stop.wait(self.timing.retry_period * (1 + JITTER * self.rand()))
        return False

    def renew(self) -> float | None:
        """One round of the leader's renewal loop: the seconds until the next round, or None once
        leadership is lost (``lost`` says why)."""
        if self.lost is None and self.clock() < self._valid_until:
            renewed = self._attempt()
            left = self._valid_until - self.clock()
            if self.lost is None and left > 0:
                return self.timing.retry_period if renewed else min(self.timing.retry_period, left)
        self._lose(self.write_refusal() or "stopped leading")
        return None

    def keep(self, on_lost: Callable[[], None]) -> threading.Thread:
        """Renew every ``retry_period`` in a daemon thread; call ``on_lost`` once when leadership is lost
        (another holder, or no successful renewal within the renew deadline)."""

        def loop() -> None:
            wait: float | None = self.timing.retry_period
            while wait is not None and not self._stop.wait(wait):
                wait = self.renew()
            if wait is None:
                on_lost()

        self._thread = threading.Thread(target=loop, name="leader-lease", daemon=True)
        self._thread.start()
        return self._thread

    def release(self) -> bool:
        """Graceful stop: stop renewing and hand the Lease over at once (empty holder). Only while this
        replica still holds it within its renew deadline: a replica that lost it never writes it."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(max(0.0, self._valid_until - self.clock()))
        if self.write_refusal() is not None:
            return False
        deadline = self._valid_until
        try:
            lease = self.kube.get("Lease", self.namespace, self.name, timeout=self._left(deadline))
            if not lease or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return False
            lease["spec"]["holderIdentity"] = None
            self.kube.put(lease, timeout=self._left(deadline))  # resourceVersion: only if still unchanged
        except ERRORS as err:
            log.warning("could not release the lease: %s", err)
            return False
        finally:
            self._leading = False
        log.info("released leader lease %s/%s", self.namespace, self.name)
        return True
