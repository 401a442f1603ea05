"""A de-duplicating work queue with delayed adds and per-key backoff (client-go's workqueue, small).

Watch events only *mark a key dirty*; worker threads take keys and reconcile them. A key is never
handed to two workers at once, and a burst of events for one key while it waits costs one
reconcile, not one per event:

* ``add(key)``: queue the key unless it already waits; if a worker holds it now, it is queued again
  when that worker calls ``done(key)``.
* ``add_after(key, seconds)``: ``add`` later; only the earliest pending time per key is kept.
* ``retry(key)``: ``add_after`` with exponential backoff per key (``forget(key)`` resets it).
* ``get()`` blocks for the next key (None once ``shutdown()`` was called).
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable

from kubetune_operator import metrics


class WorkQueue:
    def __init__(self, backoff_first: float = 5.0, backoff_max: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.backoff_first, self.backoff_max, self._clock = backoff_first, backoff_max, clock
        self._cond = threading.Condition()
        self._queue: deque[Hashable] = deque()
        self._dirty: set[Hashable] = set()        # queued, or re-added while a worker holds it
        self._processing: set[Hashable] = set()
        self._delayed: list[tuple[float, int, Hashable]] = []  # heap of (due, seq, key)
        self._due: dict[Hashable, float] = {}     # the earliest pending due time per key
        self._failures: dict[Hashable, int] = {}
        self._seq = 0
        self._shutdown = False
        self._added_at: dict[Hashable, float] = {}   # when a queued key was added (queue duration)
        self._started_at: dict[Hashable, float] = {}  # when a worker took it (work duration)

    def __len__(self) -> int:
        with self._cond:
            return len(self._queue)

    def add(self, key: Hashable) -> None:
        with self._cond:
            self._add(key)

    def _add(self, key: Hashable) -> None:
        if self._shutdown or key in self._dirty:
            return
        self._dirty.add(key)
        metrics.WORKQUEUE_ADDS.labels(metrics.QUEUE_NAME).inc()
        self._added_at.setdefault(key, self._clock())
        if key not in self._processing:
            self._queue.append(key)
            self._cond.notify()

    def add_after(self, key: Hashable, seconds: float) -> None:
        if seconds <= 0:
            return self.add(key)
        due = self._clock() + seconds
        with self._cond:
            if self._shutdown or self._due.get(key, float("inf")) <= due:
                return
            self._due[key] = due
            self._seq += 1
            heapq.heappush(self._delayed, (due, self._seq, key))
            self._cond.notify()

    def retry(self, key: Hashable) -> float:
        """Queue ``key`` again after its next backoff delay (5 s, 10 s, ... up to the maximum); returns it."""
        metrics.WORKQUEUE_RETRIES.labels(metrics.QUEUE_NAME).inc()
        with self._cond:
            failures = self._failures.get(key, 0)
            self._failures[key] = failures + 1
        delay = min(self.backoff_max, self.backoff_first * 2 ** failures)
        self.add_after(key, delay)
        return delay

    def forget(self, key: Hashable) -> None:
        """Reset the key's backoff (it succeeded)."""
        with self._cond:
            self._failures.pop(key, None)

    def discard(self, key: Hashable) -> None:
        """Drop everything known about the key (the resource was deleted)."""
        with self._cond:
            self._failures.pop(key, None)
            self._due.pop(key, None)  # its heap entry is skipped when it comes due

    def get(self, timeout: float | None = None) -> Hashable | None:
        """The next key to work on (the caller must call ``done(key)``); None on shutdown or timeout."""
        deadline = None if timeout is None else self._clock() + timeout
        with self._cond:
            while True:
                self._promote_due()
                if self._queue:
                    key = self._queue.popleft()
                    self._dirty.discard(key)
                    self._processing.add(key)
                    now = self._clock()
                    metrics.WORKQUEUE_QUEUE_SECONDS.labels(metrics.QUEUE_NAME).observe(
                        max(0.0, now - self._added_at.pop(key, now)))
                    self._started_at[key] = now
                    return key
                if self._shutdown:
                    return None
                wait = self._delayed[0][0] - self._clock() if self._delayed else None
                if deadline is not None:
                    left = deadline - self._clock()
                    if left <= 0:
                        return None
                    wait = left if wait is None else min(wait, left)
                self._cond.wait(None if wait is None else max(wait, 0.0))

    def _promote_due(self) -> None:
        now = self._clock()
        while self._delayed and self._delayed[0][0] <= now:
            due, _, key = heapq.heappop(self._delayed)
            if self._due.get(key) == due:
                del self._due[key]
                self._add(key)

    def done(self, key: Hashable) -> None:
        with self._cond:
            self._processing.discard(key)
            started = self._started_at.pop(key, None)
            if started is not None:
                metrics.WORKQUEUE_WORK_SECONDS.labels(metrics.QUEUE_NAME).observe(max(0.0, self._clock() - started))
            if key in self._dirty:
                self._queue.append(key)
                self._cond.notify()

    @property
    def closed(self) -> bool:
        """True once :meth:`shutdown` was called."""
        return self._shutdown

    def shutdown(self) -> None:
        with self._cond:
            self._shutdown = True
            self._cond.notify_all()
