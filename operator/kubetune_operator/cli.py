"""``kubetune operator``: run the kopf operator for FineTuneJob and MergeJob.

    kubetune operator --namespace team-a --namespace team-b   # watch these namespaces
    kubetune operator --all-namespaces --leader-elect         # cluster-wide, one active replica

kopf (and the kubernetes client) are imported inside the command, so ``kubetune --help`` stays fast.
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

import click

DEFAULT_TRAINER_IMAGE = "ghcr.io/kubetune/trainer:0.1.0"


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
@click.option("--startup-timeout", envvar="KUBETUNE_STARTUP_TIMEOUT", type=click.IntRange(30), default=900,
              show_default=True, help="Fail a job whose pod has not started running after this many seconds "
              "(ImagePullBackOff, Unschedulable, ...), unless its spec.startupTimeoutSeconds says otherwise.")
@click.option("--resync-seconds", envvar="KUBETUNE_RESYNC_SECONDS", type=click.FloatRange(1), default=600,
              show_default=True, help="Relist everything this often: prune what vanished in a watch gap, "
              "reconcile what is unfinished.")
@click.option("--log-format", type=click.Choice(["plain", "full", "json"]), default="plain", show_default=True)
@click.option("--verbose", "-v", is_flag=True, help="Debug logging.")
def operator(namespaces: tuple[str, ...], all_namespaces: bool, trainer_image: str, metrics_port: int,
             liveness: str | None, leader_elect: bool, lease_namespace: str, lease_name: str, startup_timeout: int,
             resync_seconds: float, log_format: str, verbose: bool) -> None:
    """Run the operator (reconciles FineTuneJob and MergeJob into batch/v1 Jobs)."""
    if bool(namespaces) == all_namespaces:
        raise click.UsageError("give --namespace (one or more) or --all-namespaces")
    import kopf

    from kubetune_operator import builders, handlers, metrics
    from kubetune_operator.controller import Controller
    from kubetune_operator.kube import Kube
    from kubetune_operator.leader import LeaderElector

    kopf.configure(verbose=verbose, log_format={"plain": kopf.LogFormat.PLAIN, "full": kopf.LogFormat.FULL,
                                                "json": kopf.LogFormat.JSON}[log_format])
    if not verbose:  # kopf logs every handled watch event at INFO ("Handler ... succeeded"): noise at scale
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    kube = Kube.from_environment()
    handlers.configure(Controller(kube, builders.Settings(trainer_image=trainer_image,
                                                          startup_timeout_seconds=startup_timeout),
                                  resync_seconds=resync_seconds),
                       None if all_namespaces else list(namespaces))
    if metrics_port:
        metrics.serve(metrics_port)

    lost = threading.Event()
    elector = None
    if leader_elect:
        identity = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        elector = LeaderElector(kube, lease_namespace, lease_name, identity)
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

        def on_lost() -> None:
            lost.set()
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
        if elector is not None and not lost.is_set():
            elector.release()
    if lost.is_set():
        metrics.HEALTH.alive = False
        click.echo("lost the leader lease; exiting", err=True)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    operator(prog_name=os.path.basename(sys.argv[0]))
