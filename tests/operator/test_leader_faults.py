"""Leader election under faults, against the real control plane: no two leaders ever write.

Two ``kubetune operator --leader-elect`` replicas share a Lease. The proof is the API server's audit
log (hack/cluster.py records every request made with a ServiceAccount token): each replica's requests
carry ``User-Agent: kubetune-operator/<identity>`` (kopf's own ones add `` kopf/<version>``), so the
old leader's writes can be counted after the moment the new leader's acquiring Lease write arrived.

* A leader frozen with SIGSTOP: the standby takes over once the lease expired; woken with SIGCONT
  while FineTuneJobs wait for it, the old leader sends no write and exits 1.
* A leader whose Lease access is revoked (its RoleBinding deleted): it stops writing before its
  renew deadline ends, exits 1, and the standby acquires only a lease duration after the last renewal.

The tests assert behaviour (zero writes, exit code, holder); each prints its measured figures on a
``LEADER-FIGURES`` line (``pytest -s``), which docs/operator.md quotes.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from clusterkit import OperatorProcess, create, create_s3_secret, free_port, ftj_spec, job, wait_for

pytestmark = pytest.mark.integration

SYSTEM_NS = "kubetune-system"
OPERATOR_USER = f"system:serviceaccount:{SYSTEM_NS}:kubetune-operator"
WRITES = {"create", "update", "patch", "delete", "deletecollection"}
LEASE_DURATION, RENEW_DEADLINE = 15.0, 10.0  # the defaults the replicas run with



def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=3) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _ts(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class Replica:
    """One operator process with leader election and its own metrics port."""

    def __init__(self, kubeconfig: str, ns: str, lease: str, log: Any) -> None:
        self.port = free_port()
        self.op = OperatorProcess(kubeconfig, [ns], log, extra=[
            "--leader-elect", "--lease-namespace", SYSTEM_NS, "--lease-name", lease,
            "--metrics-port", str(self.port)])
        self.identity = ""

    def start(self) -> Replica:
        self.op.start()
        found = wait_for(lambda: re.search(r"leader election as (\S+):", self.op.logs()), 60, "the identity log line")
        self.identity = found.group(1)
        return self

    @property
    def pid(self) -> int:
        assert self.op.proc is not None
        return self.op.proc.pid

    def stop(self) -> None:
        if self.op.proc is not None and self.op.proc.poll() is None:
            os.kill(self.pid, signal.SIGCONT)  # a stopped process handles SIGTERM only once continued
        self.op.stop()


def _lease(cluster: Any, name: str) -> dict[str, Any]:
    return cluster.request("GET", f"/apis/coordination.k8s.io/v1/namespaces/{SYSTEM_NS}/leases/{name}") or {}


def _holder(cluster: Any, name: str) -> str | None:
    return (_lease(cluster, name).get("spec") or {}).get("holderIdentity")


def _events(cluster: Any, user: str, identity: str) -> list[dict[str, Any]]:
    """The audit events of one replica (its user and its User-Agent), oldest first."""
    agent = f"kubetune-operator/{identity}"
    events = [e for e in cluster.audit_events(user) if (e.get("userAgent") or "").startswith(agent)]
    return sorted(events, key=lambda e: e["requestReceivedTimestamp"])


def _is_lease(event: dict[str, Any], lease: str) -> bool:
    return "/leases" in event["requestURI"] and (lease in event["requestURI"] or event["verb"] == "create")


def _code(event: dict[str, Any]) -> int:
    return int((event.get("responseStatus") or {}).get("code") or 0)


def _acquired_at(cluster: Any, user: str, identity: str, lease: str) -> float:
    """When the API server received the replica's first successful Lease write (its acquisition)."""
    def first() -> float | None:
        ok = [e for e in _events(cluster, user, identity)
              if _is_lease(e, lease) and e["verb"] in WRITES and _code(e) < 300]
        return _ts(ok[0]["requestReceivedTimestamp"]) if ok else None

    return wait_for(first, 10, f"{identity}'s acquiring Lease write in the audit log")


def _writes(cluster: Any, user: str, identity: str, since: float = 0.0) -> list[dict[str, Any]]:
    return [e for e in _events(cluster, user, identity)
            if e["verb"] in WRITES and _ts(e["requestReceivedTimestamp"]) >= since]


def _summary(events: list[dict[str, Any]]) -> list[str]:
    return [f"{e['requestReceivedTimestamp']} {e['verb']} {e['requestURI']} {_code(e)} {e.get('userAgent')}"
            for e in events]


def test_a_frozen_leader_writes_nothing_after_the_standby_took_over(cluster, ns, operator_identity, tmp_path):
    lease = f"freeze-{ns}"
    old = Replica(operator_identity["kubeconfig"], ns, lease, tmp_path / "old.log").start()
    new = Replica(operator_identity["kubeconfig"], ns, lease, tmp_path / "new.log")
    try:
        wait_for(lambda: _ready(old.port), 60, "the first replica leads")
        new.start()
        wait_for(lambda: "standby: another replica holds" in new.op.logs(), 60, "the second replica stands by")
        create_s3_secret(cluster, ns)
        create(cluster, ns, "FineTuneJob", "before", ftj_spec())
        wait_for(lambda: job(cluster, ns, "before-train"), 30, "the leader reconciles")
        transitions = _lease(cluster, lease)["spec"].get("leaseTransitions", 0)

        os.kill(old.pid, signal.SIGSTOP)
        frozen_wall, frozen = time.time(), time.monotonic()
        try:
            for i in range(3):  # queued in the frozen leader's watch streams, waiting for it
                create(cluster, ns, "FineTuneJob", f"during-{i}", ftj_spec())
            wait_for(lambda: _holder(cluster, lease) == new.identity, LEASE_DURATION + 30, "the standby takes over")
            for i in range(3):
                wait_for(lambda i=i: job(cluster, ns, f"during-{i}-train"), 30, "the new leader reconciles")
            create(cluster, ns, "FineTuneJob", "after", ftj_spec())  # both replicas see this one
            wait_for(lambda: job(cluster, ns, "after-train"), 30, "the new leader reconciles")
        finally:
            os.kill(old.pid, signal.SIGCONT)
            woken = time.monotonic()
        assert old.op.proc is not None
        code = old.op.proc.wait(30)
        exit_s = time.monotonic() - woken
        logs = old.op.logs()
        assert code == 1, logs[-3000:]
        assert "lost the leader lease" in logs

        acquired = _acquired_at(cluster, OPERATOR_USER, new.identity, lease)
        late = _writes(cluster, OPERATOR_USER, old.identity, since=acquired)
        assert late == [], "\n".join(_summary(late))
        assert _writes(cluster, OPERATOR_USER, old.identity), "the old leader wrote before the freeze"
        assert _holder(cluster, lease) == new.identity
        spec = _lease(cluster, lease)["spec"]
        assert spec.get("leaseTransitions", 0) == transitions + 1
        create(cluster, ns, "FineTuneJob", "later", ftj_spec())
        wait_for(lambda: job(cluster, ns, "later-train"), 30, "the new leader keeps working")
        kopf_seen = any(" kopf/" in (e.get("userAgent") or "") for e in _events(cluster, OPERATOR_USER, old.identity))
        assert kopf_seen, "kopf's requests carry the replica identity"
        print("LEADER-FIGURES", json.dumps({
            "test": "sigstop", "freeze_to_acquisition_s": round(acquired - frozen_wall, 2),
            "frozen_s": round(woken - frozen, 2), "sigcont_to_exit_s": round(exit_s, 2),
            "old_leader_writes_after_acquisition": len(late),
            "old_leader_refused_writes": logs.count(" not sent: "),
            "lease_transitions": [transitions, spec.get("leaseTransitions", 0)]}))
    finally:
        old.stop()
        new.stop()


def test_a_leader_cut_off_from_its_lease_stops_writing_before_the_renew_deadline(cluster, ns, operator_identity,
                                                                                 tmp_path):
    """Its own ServiceAccount, so that only its Lease access can be revoked: the RoleBinding goes."""
    sa, rbac = f"cut-{ns}", "/apis/rbac.authorization.k8s.io/v1"
    user = f"system:serviceaccount:{SYSTEM_NS}:{sa}"
    cluster.request("POST", f"/api/v1/namespaces/{SYSTEM_NS}/serviceaccounts", {"metadata": {"name": sa}})
    subject = [{"kind": "ServiceAccount", "name": sa, "namespace": SYSTEM_NS}]
    cluster.request("POST", f"{rbac}/clusterrolebindings", {
        "metadata": {"name": sa}, "subjects": subject,
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kubetune-operator"}})
    cluster.request("POST", f"{rbac}/namespaces/{SYSTEM_NS}/rolebindings", {
        "metadata": {"name": sa}, "subjects": subject,
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "kubetune-operator-leader"}})
    kubeconfig = str(cluster.kubeconfig_for_token(cluster.create_token(SYSTEM_NS, sa)))
    lease = f"cut-{ns}"
    old = Replica(kubeconfig, ns, lease, tmp_path / "old.log").start()
    new = Replica(operator_identity["kubeconfig"], ns, lease, tmp_path / "new.log")
    try:
        wait_for(lambda: _ready(old.port), 60, "the first replica leads")
        new.start()
        wait_for(lambda: "standby: another replica holds" in new.op.logs(), 60, "the second replica stands by")
        create_s3_secret(cluster, ns)
        create(cluster, ns, "FineTuneJob", "before", ftj_spec())
        wait_for(lambda: job(cluster, ns, "before-train"), 30, "the leader reconciles")
        transitions = _lease(cluster, lease)["spec"].get("leaseTransitions", 0)
        # cut only after a renewal (an update of the Lease), which the assertions below measure from
        wait_for(lambda: (_lease(cluster, lease)["spec"].get("renewTime") or "")
                 > (_lease(cluster, lease)["spec"].get("acquireTime") or ""), 30, "a renewal")

        cluster.request("DELETE", f"{rbac}/namespaces/{SYSTEM_NS}/rolebindings/{sa}")
        cut_wall, cut = time.time(), time.monotonic()
        assert old.op.proc is not None
        made = 0
        while old.op.proc.poll() is None and time.monotonic() - cut < LEASE_DURATION + 15:
            create(cluster, ns, "FineTuneJob", f"work-{made}", ftj_spec())  # work right up to the deadline
            made += 1
            time.sleep(1)
        code = old.op.proc.wait(10)
        exit_s = time.monotonic() - cut
        logs = old.op.logs()
        assert code == 1, logs[-3000:]
        assert "renew deadline" in logs
        wait_for(lambda: _holder(cluster, lease) == new.identity, LEASE_DURATION + 30, "the standby takes over")
        for i in range(made):
            wait_for(lambda i=i: job(cluster, ns, f"work-{i}-train"), 30, "the new leader reconciles the backlog")

        events = _events(cluster, user, old.identity)
        renewals = [e for e in events if _is_lease(e, lease) and e["verb"] == "update" and _code(e) < 300]
        denied = [e for e in events if _is_lease(e, lease) and _code(e) == 403]
        assert renewals and denied, "\n".join(_summary([e for e in events if _is_lease(e, lease)][-20:]))
        last_renewal = _ts(renewals[-1]["requestReceivedTimestamp"])
        writes = [e for e in _writes(cluster, user, old.identity) if not _is_lease(e, lease)]
        assert writes, "the leader wrote while it led"
        last_write = _ts(writes[-1]["requestReceivedTimestamp"])
        # its fence closes renew_deadline after the start of its last successful renewal, which came
        # before that renewal reached the API server (0.5 s: a write already on the wire)
        assert last_write <= last_renewal + RENEW_DEADLINE + 0.5, "\n".join(_summary(writes[-5:]))
        acquired = _acquired_at(cluster, OPERATOR_USER, new.identity, lease)
        assert acquired - last_renewal >= LEASE_DURATION - 0.05  # observed time: a full lease after the renewal
        assert _writes(cluster, user, old.identity, since=acquired) == []
        spec = _lease(cluster, lease)["spec"]
        assert spec.get("leaseTransitions", 0) == transitions + 1
        print("LEADER-FIGURES", json.dumps({
            "test": "lease-rbac-revoked", "cut_to_last_renewal_s": round(last_renewal - cut_wall, 2),
            "last_renewal_to_last_write_s": round(last_write - last_renewal, 2),
            "last_renewal_to_acquisition_s": round(acquired - last_renewal, 2),
            "cut_to_exit_s": round(exit_s, 2), "cut_to_acquisition_s": round(acquired - cut_wall, 2),
            "denied_renewal_requests": len(denied), "jobs_created_during_cut": made,
            "old_leader_refused_writes": logs.count(" not sent: "),
            "old_leader_writes_after_acquisition": 0,
            "lease_transitions": [transitions, spec.get("leaseTransitions")]}))
    finally:
        old.stop()
        new.stop()
        cluster.request("DELETE", f"{rbac}/clusterrolebindings/{sa}", ok404=True)
        cluster.request("DELETE", f"{rbac}/namespaces/{SYSTEM_NS}/rolebindings/{sa}", ok404=True)
        cluster.request("DELETE", f"/api/v1/namespaces/{SYSTEM_NS}/serviceaccounts/{sa}", ok404=True)
