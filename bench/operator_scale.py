"""Operator scale benchmark: N FineTuneJobs against a real control plane with kwok GPU nodes.

    .venv/bin/python bench/operator_scale.py --write docs/benchmarks.md            # N = 100, 500, 1000
    .venv/bin/python bench/operator_scale.py --counts 100,500 --write docs/benchmarks.md

For each N: a fresh local control plane and namespace with the S3 credentials Secret, a fresh ``kubetune operator
--namespace <ns>`` subprocess (admin kubeconfig, metrics server on a free port), then N
FineTuneJobs created as fast as 8 client threads can POST them (a burst), or paced at ``--rate`` per
second. Measured:

* apply → Job created: from just before each FineTuneJob's POST to the moment its batch/v1 Job
  arrives on a watch stream of the namespace's Jobs (p50, p99, max);
* time until every FineTuneJob has a ``status.phase`` (from the first POST);
* Jobs/s: Jobs created per second from the first POST to the last Job (the system's throughput);
* the operator's peak RSS (sampled every 0.2 s) and CPU seconds (user + system) over the round, and
  the CPU seconds of each control-plane process (where the rest of the machine's time went);
* API requests per job: the apiserver's ``apiserver_request_total`` before and after the round
  (settled for a few seconds), all clients together and split by verb/resource.

The Jobs' pods select a node label no node has, so they stay Pending: the benchmark measures the
operator's own path (validate, children, Job, status), not kwok's pod churn.

Goals: p50 < 0.5 s and p99 < 2 s at N = 500; RSS < 200 MiB at N = 1000; no request storms
(requests per job flat in N).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for _path in (REPO / "bench", REPO / "hack", REPO / "operator", REPO):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import common  # noqa: E402

GROUP = "/apis/kubetune.dev/v1alpha1"
METRIC = re.compile(r'^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>[0-9.e+]+)$')


def ftj_spec() -> dict[str, Any]:
    return {
        "model": {"uri": "s3://models/llama-3.2-1b"},
        "dataset": {"source": "jsonl", "uri": "s3://data/train.jsonl"},
        "training": {"maxSteps": 100},
        "output": {"uri": "s3://out/bench"},
        "storage": {"endpoint": "http://minio.storage:9000", "secretRef": {"name": "s3-creds"}},
        "resources": {"gpus": 1, "nodeSelector": {"kubetune.dev/bench": "no-such-node"}},
    }


class Client(threading.local):
    """The benchmark's API client, as admin: one kept-alive HTTPS connection per thread, like kubectl
    and client-go. (A new TLS handshake with a client certificate per call would charge the apiserver
    for the benchmark's own connections.)"""

    def __init__(self, cluster: Any, timeout: float = 120) -> None:
        url = urllib.parse.urlparse(cluster.server)
        self.host, self.port, self.timeout = url.hostname, url.port, timeout
        self.context = cluster.ssl_context()
        self.conn: http.client.HTTPSConnection | None = None

    def __call__(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": "application/json", **({"Content-Type": "application/json"} if data else {})}
        for attempt in (1, 2):  # a kept-alive connection the server closed: reconnect once
            if self.conn is None:
                self.conn = http.client.HTTPSConnection(self.host, self.port, context=self.context,
                                                        timeout=self.timeout)
            try:
                self.conn.request(method, path, body=data, headers=headers)
                response = self.conn.getresponse()
                text = response.read().decode(errors="replace")
                break
            except (http.client.RemoteDisconnected, ConnectionError, http.client.BadStatusLine):
                self.conn.close()
                self.conn = None
                if attempt == 2:
                    raise
        return response.status, (json.loads(text) if text.startswith("{") else text)


def request_counts(cluster: Any) -> Counter[tuple[str, str]]:
    """apiserver_request_total summed by (verb, resource) over every label else."""
    import cluster as cluster_mod

    status, text = cluster_mod._http(cluster.server + "/metrics", cluster.ssl_context(),
                                     headers={"Accept": "text/plain"}, timeout=30)
    if status != 200:
        raise RuntimeError(f"GET /metrics: HTTP {status}")
    counts: Counter[tuple[str, str]] = Counter()
    for line in text.splitlines():
        match = METRIC.match(line)
        if not match:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
        resource = labels.get("resource", "") + (f"/{labels['subresource']}" if labels.get("subresource") else "")
        counts[(labels.get("verb", ""), resource)] += int(float(match["value"]))
    return counts


class JobWatch(threading.Thread):
    """Records when each batch/v1 Job of a namespace is first seen on a watch stream."""

    def __init__(self, cluster: Any, namespace: str) -> None:
        super().__init__(daemon=True)
        self.cluster, self.namespace = cluster, namespace
        self.seen: dict[str, float] = {}
        self.ready = threading.Event()
        self.stop = False

    def run(self) -> None:
        url = urllib.parse.urlparse(self.cluster.server)
        while not self.stop:
            conn = http.client.HTTPSConnection(url.hostname, url.port, context=self.cluster.ssl_context(), timeout=600)
            conn.request("GET", f"/apis/batch/v1/namespaces/{self.namespace}/jobs?watch=1&allowWatchBookmarks=false")
            response = conn.getresponse()
            self.ready.set()
            while not self.stop:
                line = response.readline()
                if not line:
                    break
                event = json.loads(line)
                if event.get("type") == "ADDED":
                    self.seen.setdefault(event["object"]["metadata"]["name"], time.monotonic())
            conn.close()


class OperatorProcess:
    """``kubetune operator --namespace NS`` with its RSS and CPU sampled."""

    def __init__(self, kubeconfig: Path, namespace: str, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
        env.update(KUBECONFIG=str(kubeconfig), KUBETUNE_TRAINER_IMAGE="kubetune/trainer:bench")
        import localenv

        self.metrics_port = localenv.free_port()
        args = [sys.executable, "-c", "from kubetune.cli import main; main()", "operator", "--namespace", namespace,
                "--metrics-port", str(self.metrics_port)]
        with log.open("ab") as out:
            self.proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        import psutil

        self.ps = psutil.Process(self.proc.pid)
        self.peak_rss = 0
        self._stop = False
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while not self._stop:
            try:
                self.peak_rss = max(self.peak_rss, self.ps.memory_info().rss)
            except Exception:  # noqa: BLE001 - the process may be gone
                return
            time.sleep(0.2)

    def cpu_seconds(self) -> float:
        times = self.ps.cpu_times()
        return float(times.user + times.system)

    def wait_ready(self, timeout: float = 60) -> None:
        import localenv

        localenv.wait_http(f"http://127.0.0.1:{self.metrics_port}/healthz", timeout, "the operator", self.proc)

    def stop(self) -> None:
        self._stop = True
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_until(fn: Any, timeout: float, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(interval)
    return None


def component_cpu(cluster: Any) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each control-plane process."""
    import psutil

    out = {}
    for name, proc in cluster.processes.items():
        try:
            times = psutil.Process(proc["pid"]).cpu_times()
            out[name] = float(times.user + times.system)
        except psutil.Error:
            continue
    return out


def one_round(cluster: Any, n: int, logs: Path, timeout: float, rate: float = 0.0) -> dict[str, Any]:
    """One round of N FineTuneJobs; ``rate``: creations per second (0: as fast as 8 threads can POST)."""
    from kubetune_operator import builders

    ns = f"bench-{n}-{uuid.uuid4().hex[:6]}"
    cluster.request("POST", "/api/v1/namespaces", {"metadata": {"name": ns}})
    cluster.request("POST", f"/api/v1/namespaces/{ns}/secrets", {
        "metadata": {"name": "s3-creds"},
        "stringData": {"AWS_ACCESS_KEY_ID": "bench-id", "AWS_SECRET_ACCESS_KEY": "bench-secret-value"}})
    wait_until(lambda: cluster.request("GET", f"/api/v1/namespaces/{ns}/serviceaccounts/default", ok404=True), 30)
    operator = OperatorProcess(cluster.kubeconfig, ns, logs / f"operator-{n}.log")
    watch = JobWatch(cluster, ns)
    try:
        operator.wait_ready()
        watch.start()
        watch.ready.wait(30)
        time.sleep(2)  # the operator's initial list/watch settles
        before = request_counts(cluster)
        cpu_before = operator.cpu_seconds()
        components_before = component_cpu(cluster)
        operator.peak_rss = 0
        spec = ftj_spec()
        call = Client(cluster)
        created: dict[str, float] = {}

        def create(i: int) -> None:
            name = f"ftj-{i:05d}"
            if rate:  # paced: the i-th creation is due i/rate seconds after the start
                time.sleep(max(0.0, started + i / rate - time.monotonic()))
            created[name] = time.monotonic()
            status, body = call("POST", f"{GROUP}/namespaces/{ns}/finetunejobs", {
                "apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
                "spec": spec})
            if status >= 300:
                raise RuntimeError(f"POST FineTuneJob {name}: HTTP {status}: {str(body)[:200]}")

        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(create, range(n)))
        create_s = time.monotonic() - started
        job_names = {name: builders.job_name("FineTuneJob", name) for name in created}
        wait_until(lambda: all(job in watch.seen for job in job_names.values()), timeout)

        def all_have_status() -> float | None:
            status, body = call("GET", f"{GROUP}/namespaces/{ns}/finetunejobs")
            if status != 200:
                return None
            items = body["items"]
            with_status = sum(1 for item in items if (item.get("status") or {}).get("phase"))
            return time.monotonic() if with_status >= n else None

        status_at = wait_until(all_have_status, timeout, interval=1.0)
        time.sleep(5)  # let follow-up reconciles land before counting requests
        after = request_counts(cluster)
        components = {k: v - components_before.get(k, 0.0) for k, v in component_cpu(cluster).items()}
        latencies = [watch.seen[job] - created[name] for name, job in job_names.items() if job in watch.seen]
        last_job = max((watch.seen[job] for job in job_names.values() if job in watch.seen), default=None)
        delta = after - before
        own = {key: value for key, value in delta.items()
               if key[1].startswith(("finetunejobs", "mergejobs")) or key[1] in ("jobs", "configmaps", "secrets",
                                                                                 "serviceaccounts", "roles",
                                                                                 "rolebindings", "events")}
        return {
            "n": n, "rate": rate or None, "create_s": create_s, "jobs_seen": len(latencies),
            "jobs_per_s": len(latencies) / (last_job - started) if last_job else None,
            "latency_p50_s": common.percentile(latencies, 50), "latency_p99_s": common.percentile(latencies, 99),
            "latency_max_s": max(latencies) if latencies else None,
            "all_status_s": status_at - started if status_at else None,
            "operator_peak_rss_mib": operator.peak_rss / 2**20,
            "operator_cpu_s": operator.cpu_seconds() - cpu_before,
            "control_plane_cpu_s": {k: round(v, 2) for k, v in sorted(components.items(), key=lambda kv: -kv[1])},
            "requests_total": sum(delta.values()), "requests_per_job": sum(delta.values()) / n,
            "requests_by_verb_resource": {f"{verb} {res}": count for (verb, res), count in
                                          sorted(own.items(), key=lambda kv: -kv[1])},
        }
    finally:
        watch.stop = True
        operator.stop()
        cluster.request("DELETE", f"/api/v1/namespaces/{ns}", ok404=True)


def _creation(result: dict[str, Any]) -> str:
    return f"{result['rate']:g}/s" if result.get("rate") else "burst"


def render(doc: dict[str, Any]) -> str:
    rows = [[r["n"], _creation(r), r.get("jobs_seen"), r.get("create_s"),
             r.get("jobs_per_s"), r.get("latency_p50_s"), r.get("latency_p99_s"), r.get("latency_max_s"),
             r.get("all_status_s"), r.get("operator_peak_rss_mib"),
             r["operator_cpu_s"] * 1000 / r["n"] if r.get("operator_cpu_s") is not None else None,
             r.get("requests_per_job")] if not r.get("error") else [r["n"], f"error: {r['error'][:150]}"] + [None] * 10
            for r in doc["results"]]
    headers = ["N", "creation", "Jobs created", "POSTs took (s)", "Jobs/s", "apply→Job p50 (s)", "p99 (s)",
               "max (s)", "all have status (s)", "operator peak RSS (MiB)", "operator CPU per job (ms)",
               "API requests per job"]
    detail = []
    for r in doc["results"]:
        label = f"N={r['n']} ({_creation(r)})"
        if r.get("requests_by_verb_resource"):
            top = ", ".join(f"{k}: {v / r['n']:.2f}" for k, v in list(r["requests_by_verb_resource"].items())[:12])
            detail.append(f"- {label}, per job, kubetune-related resources (all clients): {top}")
        if r.get("control_plane_cpu_s"):
            cpu = ", ".join(f"{k} {v * 1000 / r['n']:.0f}" for k, v in r["control_plane_cpu_s"].items())
            detail.append(f"- {label}, control-plane CPU per job (ms): {cpu}")
    m = doc["machine"]
    return "\n".join([
        "## Operator at scale", "",
        f"- Command: `{doc['command']}`", f"- Machine: {common.describe_machine(m)} (shared with other work: "
        "latencies include CPU contention)",
        f"- Versions: {common.describe_versions(doc['versions'])}, Kubernetes {doc.get('k8s', '?')} (local "
        "control plane, kwok nodes)", f"- Date: {doc['date']}",
        "- Pods stay Pending (no node matches): the numbers are the operator's own path. API requests per job "
        "count every client (operator, controller-manager, the benchmark's own POSTs and status polls).", "",
        common.table(headers, rows), *detail, "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", default="100,500,1000")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="FineTuneJobs created per second (0: a burst, as fast as 8 threads can POST)")
    parser.add_argument("--timeout", type=float, default=600, help="per round, for Jobs and statuses to appear")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--from-json", type=Path, action="append", default=[],
                        help="render saved runs (several: their rows in one table)")
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    if args.from_json:
        runs = [json.loads(path.read_text()) for path in args.from_json]
        doc = {**runs[0], "results": [r for run in runs for r in run["results"] if not r.get("error")
                                      or not any(o["n"] == r["n"] and not o.get("error")
                                                 for other in runs for o in other["results"])],
               "command": "; ".join(dict.fromkeys(run["command"] for run in runs))}
    else:
        import cluster as cluster_mod

        doc = {"date": common.now_utc(), "machine": common.machine(), "versions": common.versions(),
               "command": common.command_line(), "k8s": cluster_mod.K8S_VERSION, "results": []}
        logs = Path(tempfile.mkdtemp(prefix="kt-bench-operator-"))
        print(f"operator logs in {logs}", flush=True)
        for n in (int(x) for x in args.counts.split(",")):
            # a fresh control plane per round: no round pays for the previous one's garbage collection
            c = cluster_mod.LocalCluster.start()
            try:
                c.install_crds(REPO / "crds")
                result = one_round(c, n, logs, args.timeout, args.rate)
            except Exception as err:  # noqa: BLE001 - one failed round must not lose the others
                result = {"n": n, "error": f"{type(err).__name__}: {err}"}
            finally:
                c.stop()
            print(json.dumps(result), flush=True)
            doc["results"].append(result)
            if args.json_out:
                args.json_out.write_text(json.dumps(doc, indent=1))
    text = render(doc)
    print(text)
    if args.write:
        common.update_section(args.write, "operator", text)


if __name__ == "__main__":
    main()
