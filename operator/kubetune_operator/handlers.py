"""kopf handlers: watch events in, keys out. All of them are short and make no API call.

* FineTuneJob / MergeJob events (the initial listing, ADDED, MODIFIED, DELETED): cache the body,
  queue its key. The initial listing after a restart is the resume.
* the child Jobs and pods (label ``kubetune.dev/kind``): cache them, queue their owner's key, so a
  pod that starts, fails or ends shows in the status within a second.

The controller's worker threads do the reconciling (controller.py). Only event handlers are used,
so kopf keeps no per-object state in the cluster: no annotations, no finalizers, no status fields.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import kopf

from kubetune import api, contract
from kubetune_operator import metrics
from kubetune_operator.controller import Controller

log = logging.getLogger("kubetune.operator")
PLURALS = ("finetunejobs", "mergejobs")

_controller: Controller | None = None
_tasks: set[asyncio.Task[None]] = set()
_namespaces: list[str] | None = None


def configure(controller: Controller, namespaces: list[str] | None = None) -> None:
    """Install the controller the handlers use and the namespaces it watches (None: all); the CLI
    does this before kopf starts."""
    global _controller, _namespaces
    _controller, _namespaces = controller, namespaces


def controller() -> Controller:
    if _controller is None:
        raise kopf.PermanentError("the kubetune controller is not configured (run `kubetune operator`)")
    return _controller


class NoDiffBase(kopf.DiffBaseStorage):
    """No diff-base: with only event handlers kopf never compares old and new specs, but it would
    still deep-copy every watched body on every event to build one (a third of its CPU at scale)."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> None:  # type: ignore[override]
        return None

    def fetch(self, *, body: kopf.Body) -> None:  # type: ignore[override]
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: Any) -> None:
        return None


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.posting.level = logging.WARNING  # kopf's own log lines as Events: warnings only
    # No cluster-wide discovery of namespaces/CRDs: it needs list/watch on both, which the chart's
    # least-privilege ClusterRole does not grant. Install the CRDs before the operator (the chart does).
    settings.scanning.disabled = True
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    # Server-side filters: the handlers' ``labels=`` below are only client-side in kopf, so without
    # these the operator would list and stream every Job and pod of the cluster (review #3).
    settings.watching.label_selectors["batch", "v1", "jobs"] = contract.LABEL_KIND
    settings.watching.label_selectors["v1", "pods"] = contract.LABEL_KIND
    # Events come from kubetune, not "kopf" (the From column of `kubectl describe`).
    settings.posting.reporting_component = "kubetune-operator"
    settings.posting.reporting_instance = socket.gethostname()
    settings.posting.event_name_prefix = "kubetune-"
    controller().prefill(_namespaces)  # before kopf's watches start
    metrics.HEALTH.ready = True


@kopf.on.startup()
async def loop_heartbeat(**_: Any) -> None:
    """/healthz fails when kopf's event loop stops turning (a blocking call in it, a deadlock)."""

    async def beat() -> None:
        while True:
            metrics.HEALTH.beat("event-loop", 30.0)
            await asyncio.sleep(5.0)

    _tasks.add(asyncio.get_running_loop().create_task(beat()))


@kopf.on.cleanup()
def cleanup(**_: Any) -> None:
    metrics.HEALTH.ready = False
    for task in _tasks:
        task.cancel()
    metrics.HEALTH.forget("event-loop")
    controller().stop()


for _plural in PLURALS:

    @kopf.on.event(api.GROUP, api.VERSION, _plural)
    async def resource_event(body: kopf.Body, type: str | None, **_: Any) -> None:  # noqa: A002 - kopf's name
        controller().start()
        controller().observed(dict(body), deleted=type == "DELETED")


@kopf.on.event("batch", "v1", "jobs", labels={contract.LABEL_KIND: kopf.PRESENT})
async def child_job(body: kopf.Body, type: str | None, **_: Any) -> None:  # noqa: A002
    controller().start()
    controller().observed_child(dict(body), deleted=type == "DELETED")


@kopf.on.event("", "v1", "pods", labels={contract.LABEL_KIND: kopf.PRESENT})
async def child_pod(body: kopf.Body, type: str | None, **_: Any) -> None:  # noqa: A002
    controller().start()
    controller().observed_child(dict(body), deleted=type == "DELETED")
