"""``kubetune operator``: run the kopf operator for FineTuneJob and MergeJob.

    kubetune operator --namespace team-a --namespace team-b   # watch these namespaces
    kubetune operator --all-namespaces --leader-elect         # cluster-wide, one active replica

kopf (and the kubernetes client) are imported inside the command, so ``kubetune --help`` stays fast.

With ``--leader-elect``, losing the Lease (another holder, or no renewal within the renew deadline)
fences the API client first -- no write leaves the process from then on, kopf's Event posts included
-- then stops the workers and exits 1, at the latest ``EXIT_GRACE`` seconds later (``os._exit``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import threading
import uuid
from typing import Any

import click

DEFAULT_TRAINER_IMAGE = "ghcr.io/kubetune/trainer:0.1.0"
EXIT_GRACE = 2.0  # seconds a replica that lost the lease may take to exit cleanly before os._exit(1)


@click.command(name="operator")
@click.option("--namespace", "-n", "namespaces", multiple=True, metavar="NS",
              help="Namespace to watch (repeatable).")
@click.option("--all-namespaces", "-A", is_flag=True, help="Watch the whole cluster.")
@click.option("--trainer-image", envvar="KUBETUNE_TRAINER_IMAGE", default=DEFAULT_TRAINER_IMAGE, show_default=True,
              help="Image for jobs whose spec.image is empty.")
@click.option("--metrics-port", envvar="KUBETUNE_METRICS_PORT", type=int, default=8080, show_default=True,
              help="Port of /metrics, /healthz and /readyz (0 disables).")
@click.option("--liveness", "liveness", default=None, metavar="URL",
              help="Also serve kopf's own liveness probe, e.g. http://0.0.0.0:8081/healthz.")
@click.option("--leader-elect/--no-leader-elect", default=False, show_default=True,
              help="Hold a coordination.k8s.io Lease so only one replica acts.")
@click.option("--lease-namespace", envvar="POD_NAMESPACE", default="default", show_default=True)
@click.option("--lease-name", default="kubetune-operator", show_default=True)
@click.option("--lease-duration", type=float, default=15.0, show_default=True, metavar="SECONDS",
              help="A standby takes over once it has seen the Lease unchanged for this long.")
@click.option("--renew-deadline", type=float, default=10.0, show_default=True, metavar="SECONDS",
              help="The leader stops writing and exits when it has not renewed for this long.")
@click.option("--retry-period", type=float, default=2.0, show_default=True, metavar="SECONDS",
              help="How often the leader renews and a standby retries.")
@click.option("--startup-timeout", envvar="KUBETUNE_STARTUP_TIMEOUT", type=click.IntRange(30), default=900,
              show_default=True, help="Fail a job whose pod has not started running after this many seconds "
              "(ImagePullBackOff, Unschedulable, ...), unless its spec.startupTimeoutSeconds says otherwise.")
@click.option("--resync-seconds", envvar="KUBETUNE_RESYNC_SECONDS", type=click.FloatRange(1), default=600,
              show_default=True, help="Relist everything this often: prune what vanished in a watch gap, "
              "reconcile what is unfinished.")
@click.option("--run-as-user", envvar="KUBETUNE_RUN_AS_USER", default="1000", show_default=True, metavar="UID",
              help="UID (and GID, fsGroup) of every pod unless its spec.pod sets one; empty leaves them to the "
              "platform (OpenShift assigns one per namespace).")
@click.option("--check-secrets/--no-check-secrets", default=True, show_default=True,
              help="Read the Secrets a job names before making its pod (needs get on secrets), to say which "
              "one or which key is missing; off: a missing one shows as the pod's CreateContainerConfigError.")
@click.option("--model-cache-claim", envvar="KUBETUNE_MODEL_CACHE_CLAIM", default="", metavar="PVC",
              help="PersistentVolumeClaim (in each job's namespace) that keeps base models for every job "
              "that sets no spec.modelCache; empty: none.")
@click.option("--pod-defaults", envvar="KUBETUNE_POD_DEFAULTS", default="", metavar="JSON|@FILE",
              help="The platform's pod settings for every job (the spec.pod fields: labels, annotations, "
              "imagePullSecrets, runtimeClassName, serviceAccountName, env, volumes, ...), as JSON or @file; "
              "each job's spec.pod goes on top.")
@click.option("--log-format", type=click.Choice(["plain", "full", "json"]), default="plain", show_default=True)
@click.option("--verbose", "-v", is_flag=True, help="Debug logging.")
def operator(namespaces: tuple[str, ...], all_namespaces: bool, trainer_image: str, metrics_port: int,
             liveness: str | None, leader_elect: bool, lease_namespace: str, lease_name: str,
             lease_duration: float, renew_deadline: float, retry_period: float, startup_timeout: int,
             resync_seconds: float, run_as_user: str, check_secrets: bool, model_cache_claim: str, pod_defaults: str,
             log_format: str, verbose: bool) -> None:
    """Run the operator (reconciles FineTuneJob and MergeJob into batch/v1 Jobs)."""
    if bool(namespaces) == all_namespaces:
        raise click.UsageError("give --namespace (one or more) or --all-namespaces")
    from kubetune_operator.leader import LeaderElector, Timing

    try:
        timing = Timing(lease_duration, renew_deadline, retry_period)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    import kopf

    from kubetune_operator import builders, handlers, metrics
    from kubetune_operator.controller import Controller
    from kubetune_operator.kube import Kube

    kopf.configure(verbose=verbose, log_format={"plain": kopf.LogFormat.PLAIN, "full": kopf.LogFormat.FULL,
                                                "json": kopf.LogFormat.JSON}[log_format])
    if not verbose:  # kopf logs every handled watch event at INFO ("Handler ... succeeded"): noise at scale
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    identity = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    user_agent = f"kubetune-operator/{identity}"  # the API server's audit log tells replicas apart
    kube = Kube.from_environment(user_agent)
    settings = builders.Settings(trainer_image=trainer_image, startup_timeout_seconds=startup_timeout,
                                 run_as_user=_uid(run_as_user), pod_defaults=_pod_defaults(pod_defaults),
                                 model_cache_claim=model_cache_claim or None, check_secrets=check_secrets)
    controller = Controller(kube, settings,
                            resync_seconds=resync_seconds)
    handlers.configure(controller, None if all_namespaces else list(namespaces))
    _kopf_login(kube, user_agent)
    if metrics_port:
        metrics.serve(metrics_port)

    lost = threading.Event()
    elector = None
    if leader_elect:
        # The Lease has a client of its own (own connection pool, no fence); the operator's client
        # refuses writes unless this replica leads within its renew deadline.
        elector = LeaderElector(Kube.from_environment(user_agent), lease_namespace, lease_name, identity, timing)
        kube.write_guard = elector.write_refusal
        logging.getLogger("kubetune.leader").info(
            "leader election as %s: Lease %s/%s, lease %gs, renew deadline %gs, retry %gs", identity,
            lease_namespace, lease_name, timing.lease_duration, timing.renew_deadline, timing.retry_period)
        previous = {s: signal.signal(s, lambda *_: elector.stop()) for s in (signal.SIGTERM, signal.SIGINT)}
        if not elector.acquire():
            return  # stopped while standing by
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        metrics.LEADER.set(1)
    logging.getLogger("kubetune.operator").info(
        "starting: %s, trainer image %s", "all namespaces" if all_namespaces else ", ".join(namespaces),
        trainer_image)

    async def run() -> None:
        # An asyncio.Event (not a threading.Event, whose wait would pin an executor thread and hang the
        # shutdown): set from the lease thread when leadership is lost. SIGTERM/SIGINT: kopf stops itself.
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def on_lost() -> None:  # in the lease thread: fence first, then stop everything
            kube.fence("lost the leader lease")
            lost.set()
            metrics.HEALTH.ready, metrics.HEALTH.alive = False, False
            metrics.LEADER.set(0)
            controller.stop(timeout=0)  # queue.shutdown(): the workers take no new key
            _exit_later(EXIT_GRACE)
            loop.call_soon_threadsafe(stop.set)

        if elector is not None:
            elector.keep(on_lost=on_lost)
        await kopf.operator(standalone=True, clusterwide=all_namespaces, namespaces=list(namespaces),
                            stop_flag=stop, liveness_endpoint=liveness)

    try:
        asyncio.run(run())
    finally:
        metrics.HEALTH.ready = False
        metrics.LEADER.set(0)
        kube.fence("stopping")  # nothing more, even from a worker that outlived its join, once the Lease is free
        if elector is not None and not lost.is_set():
            elector.release()
    if lost.is_set():
        click.echo("lost the leader lease; exiting", err=True)
        sys.exit(1)


def _exit_later(seconds: float) -> None:
    """``os._exit(1)`` in ``seconds`` unless the process has exited by then (kopf's graceful stop and
    the workers' join may take longer; nothing they do reaches the API server any more)."""

    def bye() -> None:
        logging.getLogger("kubetune.operator").error("lost the leader lease; exiting now (after %gs)", seconds)
        logging.shutdown()
        sys.stderr.flush()
        os._exit(1)

    timer = threading.Timer(seconds, bye)
    timer.daemon = True
    timer.start()


def _fence_middleware(kube: Any) -> Any:
    """An aiohttp client middleware: a write that ``kube`` refuses raises Fenced before it is sent."""

    async def fence(request: Any, handler: Any) -> Any:
        kube.check_write(request.method, request.url.path)
        return await handler(request)

    return fence


def _kopf_login(kube: Any, user_agent: str) -> None:
    """kopf's own requests (its watches, the Events it posts) go through an aiohttp session with this
    replica's User-Agent and the same write fence as ``kube``: a kopf login handler that takes the
    credentials kopf would (``kopf.login_via_client``) and builds the session kopf would build."""
    import importlib.metadata

    import aiohttp
    import kopf

    agent = f"{user_agent} kopf/{importlib.metadata.version('kopf')}"
    fence = _fence_middleware(kube)

    @kopf.on.login(id="kubetune")
    async def login(**kwargs: Any) -> kopf.AiohttpSession | None:
        info = kopf.login_via_client(**kwargs)
        if info is None:
            return None
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ssl=info.as_ssl_context()),
            headers={**info.as_http_headers(), "User-Agent": agent},
            proxy=info.proxy_url, trust_env=info.trust_env, middlewares=(fence,))
        return kopf.AiohttpSession(aiohttp_session=session, server=info.server, priority=info.priority,
                                   default_namespace=info.default_namespace, expiration=info.expiration)


if __name__ == "__main__":  # pragma: no cover
    operator(prog_name=os.path.basename(sys.argv[0]))


def _uid(text: str) -> int | None:
    if not text.strip():
        return None
    try:
        uid = int(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a UID", param_hint="--run-as-user") from None
    if uid < 1:
        raise click.BadParameter("pods run as non-root: the UID must be 1 or more", param_hint="--run-as-user")
    return uid


def _pod_defaults(text: str) -> Any:
    """--pod-defaults: JSON (or @file, JSON or YAML) validated as spec.pod."""
    if not text.strip():
        return None
    import yaml
    from pydantic import ValidationError

    from kubetune import api

    try:
        doc = yaml.safe_load(open(text[1:]).read() if text.startswith("@") else text)  # noqa: SIM115
        return api.PodSettings.model_validate(doc or {})
    except (OSError, yaml.YAMLError, ValidationError) as err:
        raise click.BadParameter(str(err), param_hint="--pod-defaults") from None
