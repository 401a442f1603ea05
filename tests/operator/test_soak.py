"""The soak: 50 FineTuneJobs while the faults of test_cluster_faults.py happen together.

Two operator replicas with leader election run against the real control plane; a kubelet stand-in
(a thread of this test) runs each pod for 1-4 s and ends it (one first attempt in ten fails and is
retried by the Job controller); every Job has ``ttlSecondsAfterFinished: 0``. Meanwhile, in order:
the leader is SIGKILLed, the new leader is frozen (SIGSTOP) past its lease and thawed, the API
server is restarted (every watch breaks; the new watch cache is newer than the operators' last
resourceVersion), five resources are deleted and re-created under their names, and the leader is
SIGKILLed once more. S3 is not in this picture (the pods are simulated); the trainer's own fault
tests cover dropped S3 connections.

Counted (printed as one JSON line, the figures in docs/operator.md "Under faults"):
* completed: resources Succeeded at the end (all of them must be);
* duplicates: Jobs the operator created beyond one per resource uid (audit log; must be 0);
* stuck: resources not Succeeded/Failed when the run ends (must be 0);
* regressions: a resource seen leaving Succeeded/Failed, or its attempts going down (polled every
  0.3 s; must be 0), and status writes the CRD refused as a terminal-phase change;
* converge_s: from the last fault to the last resource finished.
"""

from __future__ import annotations

import json
import random
import re
import signal
import threading
import time
from typing import Any

import pytest
from clusterkit import (
    GROUP,
    OPERATOR_USER,
    OperatorProcess,
    create,
    create_s3_secret,
    force_delete,
    ftj_spec,
    kubelet_exit,
    kubelet_run,
    term_message,
    wait_for,
)

pytestmark = pytest.mark.integration
N = 50
RECREATED = 5


class Kubelet(threading.Thread):
    """Plays the kubelet for the pods of one namespace: start, run 1-4 s, end; force-deletes pods
    that are being deleted (a kubelet confirms the container is gone)."""

    def __init__(self, cluster: Any, ns: str, seed: int = 7) -> None:
        super().__init__(daemon=True, name="kubelet")
        self.cluster, self.ns, self.rng = cluster, ns, random.Random(seed)
        self.stop = threading.Event()
        self.started: dict[str, float] = {}
        self.failed_first: set[str] = set()

    def run(self) -> None:
        while not self.stop.wait(0.3):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the API server may be restarting
                time.sleep(0.5)

    def tick(self) -> None:
        items = self.cluster.request("GET", f"/api/v1/namespaces/{self.ns}/pods?labelSelector=kubetune.dev%2Fkind"
                                     )["items"]
        for pod in items:
            name, phase = pod["metadata"]["name"], (pod.get("status") or {}).get("phase")
            if pod["metadata"].get("deletionTimestamp"):
                force_delete(self.cluster, pod)
            elif phase == "Pending" and pod["spec"].get("nodeName") and name not in self.started:
                kubelet_run(self.cluster, pod)
                self.started[name] = time.monotonic() + self.rng.uniform(1, 4)
            elif phase == "Running" and time.monotonic() >= self.started.get(name, float("inf")):
                owner = pod["metadata"]["annotations"]["kubetune.dev/owner"].split("/")[1]
                if owner not in self.failed_first and self.rng.random() < 0.1:
                    self.failed_first.add(owner)
                    kubelet_exit(self.cluster, pod, 1, "RuntimeError: NCCL timeout (injected)")
                else:
                    kubelet_exit(self.cluster, pod, 0, term_message("Completed", "ok",
                                                                    adapterUri=f"s3://out/{owner}/adapter"))


class Watcher(threading.Thread):
    """Polls every resource's status; records regressions."""

    def __init__(self, cluster: Any, ns: str) -> None:
        super().__init__(daemon=True, name="watcher")
        self.cluster, self.ns = cluster, ns
        self.stop = threading.Event()
        self.seen: dict[str, dict[str, Any]] = {}  # uid -> last status seen
        self.regressions: list[str] = []

    def run(self) -> None:
        while not self.stop.wait(0.3):
            try:
                items = self.cluster.request("GET", f"{GROUP}/namespaces/{self.ns}/finetunejobs")["items"]
            except Exception:  # noqa: BLE001
                continue
            for item in items:
                uid, st = item["metadata"]["uid"], item.get("status") or {}
                before = self.seen.get(uid)
                if before:
                    if before.get("phase") in ("Succeeded", "Failed") and st.get("phase") != before["phase"]:
                        self.regressions.append(f"{item['metadata']['name']}: {before['phase']} -> {st.get('phase')}")
                    if (st.get("attempts") or 0) < (before.get("attempts") or 0):
                        self.regressions.append(f"{item['metadata']['name']}: attempts went down")
                self.seen[uid] = st


def test_fifty_jobs_under_combined_faults(cluster, ns, operator_identity, tmp_path):
    lease = (operator_identity["namespace"], f"soak-{ns}")
    args = ["--leader-elect", "--lease-namespace", lease[0], "--lease-name", lease[1], "--resync-seconds", "20"]
    ops = [OperatorProcess(operator_identity["kubeconfig"], [ns], tmp_path / f"op{i}.log", extra=args)
           for i in range(2)]
    create_s3_secret(cluster, ns)
    kubelet, watcher = Kubelet(cluster, ns), Watcher(cluster, ns)
    faults: list[dict[str, Any]] = []
    ex_leader: dict[str, Any] = {}
    spec = ftj_spec(ttlSecondsAfterFinished=0, backoffLimit=3)
    spec["resources"] = {**spec["resources"], "gpus": 0}

    def holder() -> str:
        doc = cluster.request("GET", f"/apis/coordination.k8s.io/v1/namespaces/{lease[0]}/leases/{lease[1]}",
                              ok404=True)
        return ((doc or {}).get("spec") or {}).get("holderIdentity") or ""

    def identity(op: OperatorProcess) -> str | None:
        """The running incarnation's identity (the log is appended to across restarts)."""
        found = re.findall(r"leader election as (\S+):", op.logs())
        return found[-1] if found and op.proc and op.proc.poll() is None else None

    def leader() -> OperatorProcess:
        """The live replica holding the Lease (after a SIGKILL the Lease names the dead one until the
        standby takes over: wait for that)."""
        return wait_for(lambda: next((op for op in ops if identity(op) == holder()), None), 60,
                        "a live replica holding the lease")

    def keep_two() -> None:
        for op in ops:
            if op.proc is None or op.proc.poll() is not None:
                op.start()

    def fault(name: str, action: Any) -> None:
        t0 = time.monotonic()
        action()
        faults.append({"fault": name, "at_s": round(t0 - start, 1), "took_s": round(time.monotonic() - t0, 1)})
        keep_two()

    try:
        for op in ops:
            op.start()
        kubelet.start()
        watcher.start()
        start = time.monotonic()
        for i in range(N):
            create(cluster, ns, "FineTuneJob", f"soak-{i:02d}", spec)
        time.sleep(3)
        fault("SIGKILL leader", lambda: leader().kill())
        time.sleep(4)

        def freeze() -> None:
            frozen = leader()
            frozen.proc.send_signal(signal.SIGSTOP)
            try:
                wait_for(lambda: holder() not in ("", identity(frozen)), 60, "the standby takes over")
            finally:
                frozen.proc.send_signal(signal.SIGCONT)
            t0 = time.monotonic()
            try:
                ex_leader["exit"] = frozen.proc.wait(30)  # the ex-leader must stop
                ex_leader["exit_s"] = round(time.monotonic() - t0, 2)
            except Exception:  # noqa: BLE001 - still running: asserted below
                ex_leader["exit"] = None
                ex_leader["log"] = frozen.logs()[-4000:]

        fault("SIGSTOP leader past its lease, SIGCONT", freeze)
        time.sleep(3)
        fault("API server restart", lambda: cluster.restart_apiserver(down_seconds=2))
        time.sleep(3)

        def recreate() -> None:
            for i in range(RECREATED):
                cluster.request("DELETE", f"{GROUP}/namespaces/{ns}/finetunejobs/soak-{i:02d}",
                                {"propagationPolicy": "Background"})
                create(cluster, ns, "FineTuneJob", f"soak-{i:02d}", spec)

        fault("delete and re-create 5 resources", recreate)
        time.sleep(3)
        fault("SIGKILL leader", lambda: leader().kill())
        last_fault = time.monotonic()

        def finished() -> list[dict[str, Any]] | None:
            items = cluster.request("GET", f"{GROUP}/namespaces/{ns}/finetunejobs")["items"]
            done = [i for i in items if (i.get("status") or {}).get("phase") in ("Succeeded", "Failed")]
            return items if len(done) == N else None

        items = wait_for(finished, 300, "every resource finished", interval=1.0)
        converge = time.monotonic() - last_fault
        time.sleep(5)  # room for a wrong re-create after the end
        kubelet.stop.set()
        watcher.stop.set()

        creates: dict[str, int] = {}
        refused_regressions = 0
        for ev in cluster.audit_events(OPERATOR_USER):
            ref = ev.get("objectRef") or {}
            if ref.get("namespace") != ns:
                continue
            if ev["verb"] == "create" and ref.get("resource") == "jobs" and ev["responseStatus"].get("code") == 201:
                creates[ref.get("name", "")] = creates.get(ref.get("name", ""), 0) + 1
            if ev["verb"] == "patch" and ref.get("subresource") == "status" and ev["responseStatus"].get("code") == 422:
                refused_regressions += 1
        # one Job per resource uid: the five re-created names had two owners each
        expected = {f"soak-{i:02d}-train": 2 if i < RECREATED else 1 for i in range(N)}
        duplicates = sum(max(0, creates.get(name, 0) - want) for name, want in expected.items())
        phases = [(i.get("status") or {}).get("phase") for i in items]
        report = {"resources": N, "recreated": RECREATED, "completed": phases.count("Succeeded"),
                  "failed": phases.count("Failed"), "duplicates": duplicates,
                  "stuck": N - phases.count("Succeeded") - phases.count("Failed"),
                  "regressions": len(watcher.regressions), "refused_phase_changes": refused_regressions,
                  "first_attempt_failures": len(kubelet.failed_first), "faults": faults,
                  "converge_s": round(converge, 1), "thawed_ex_leader": ex_leader,
                  "total_s": round(time.monotonic() - start, 1)}
        print("SOAK", json.dumps(report))
        assert duplicates == 0, creates
        assert report["completed"] == N, [(i["metadata"]["name"], i.get("status")) for i in items
                                          if (i.get("status") or {}).get("phase") != "Succeeded"]
        assert watcher.regressions == [], watcher.regressions
        assert ex_leader["exit"] == 1, ex_leader  # the thawed ex-leader stepped down and exited
        for i in range(RECREATED):  # the namesakes ran their own Jobs
            assert creates[f"soak-{i:02d}-train"] == 2
    finally:
        kubelet.stop.set()
        watcher.stop.set()
        for op in ops:
            if op.proc and op.proc.poll() is None:
                op.proc.send_signal(signal.SIGCONT)
            op.stop()
