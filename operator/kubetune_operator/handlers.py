"""kopf handlers: short, and all of them call the same level-based reconcile.

* FineTuneJob/MergeJob create, resume (operator restart), update (``spec.suspend``): reconcile.
* a resync timer per unfinished resource: reconcile when due (every 60 s when healthy, with
  exponential backoff 5 s .. 5 min while blocked on a missing Secret or FineTuneJob).
* the child Jobs and pods (label ``kubetune.dev/kind``): reconcile their owner, so a pod that
  starts, fails or ends shows in the status within a second.

kopf's own bookkeeping goes to annotations (``kubetune.dev/...``), never to ``status``; the
handlers return None so nothing lands in status either.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from kubetune import api, contract
from kubetune_operator import metrics, status
from kubetune_operator.controller import Controller

log = logging.getLogger("kubetune.operator")
PLURALS = {"finetunejobs": "FineTuneJob", "mergejobs": "MergeJob"}
RETRY_BACKOFF = 15  # seconds between retries of a handler that raised (API errors)

_controller: Controller | None = None


def configure(controller: Controller) -> None:
    """Install the controller the handlers use (the CLI does this before kopf starts)."""
    global _controller
    _controller = controller


def controller() -> Controller:
    if _controller is None:
        raise kopf.PermanentError("the kubetune controller is not configured (run `kubetune operator`)")
    return _controller


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=api.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=api.GROUP, key="last-handled-configuration")
    settings.posting.level = logging.WARNING  # kopf's own log lines as Events: warnings only
    settings.execution.max_workers = 8
    # No cluster-wide discovery of namespaces/CRDs: it needs list/watch on both, which the chart's
    # least-privilege ClusterRole does not grant. Install the CRDs before the operator (the chart does).
    settings.scanning.disabled = True
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    metrics.HEALTH.ready = True


@kopf.on.cleanup()
def cleanup(**_: Any) -> None:
    metrics.HEALTH.ready = False


def _not_finished(status: kopf.Status, **_: Any) -> bool:
    return not _is_finished(dict(status))


_is_finished = status.is_finished

for _plural in PLURALS:

    @kopf.on.resume(api.GROUP, api.VERSION, _plural, backoff=RETRY_BACKOFF)
    @kopf.on.create(api.GROUP, api.VERSION, _plural, backoff=RETRY_BACKOFF)
    @kopf.on.update(api.GROUP, api.VERSION, _plural, backoff=RETRY_BACKOFF)
    def changed(body: kopf.Body, name: str, namespace: str | None, **_: Any) -> None:
        controller().reconcile(body["kind"], namespace or "", name)

    @kopf.timer(api.GROUP, api.VERSION, _plural, interval=5, initial_delay=5, when=_not_finished)
    def resync(body: kopf.Body, name: str, namespace: str | None, **_: Any) -> None:
        controller().reconcile(body["kind"], namespace or "", name, timer=True)

    @kopf.on.delete(api.GROUP, api.VERSION, _plural, optional=True)
    def deleted(body: kopf.Body, name: str, namespace: str | None, **_: Any) -> None:
        controller().forget(body["kind"], namespace or "", name)


@kopf.on.event("batch", "v1", "jobs", labels={contract.LABEL_KIND: kopf.PRESENT})
def child_job(body: kopf.Body, type: str | None, **_: Any) -> None:  # noqa: A002 - kopf's kwarg name
    if type is not None:  # None: the initial listing, which the resume handlers cover
        controller().reconcile_owner_of(dict(body))


@kopf.on.event("", "v1", "pods", labels={contract.LABEL_KIND: kopf.PRESENT})
def child_pod(body: kopf.Body, type: str | None, **_: Any) -> None:  # noqa: A002
    if type is not None:
        controller().reconcile_owner_of(dict(body))
