#!/usr/bin/env python3
"""Real Kueue on the local control plane of ``hack/cluster.py``.

Commands::

    python hack/kueue.py build     # build + cache Kueue's manager and its manifests (a no-op when cached)

The controller manager is ``go install``-ed from the Go module ``sigs.k8s.io/kueue`` (the module
has no ``replace`` directives, so ``go install sigs.k8s.io/kueue/cmd/kueue@<version>`` works with
the module proxy alone); its CRDs, the CRD conversion patches and the webhook configurations are
copied from the module's own ``config/components/{crd,webhook}`` tree. All of it is cached in
``${KUBETUNE_CACHE:-~/.cache/kubetune}/kueue/<version>/`` (``bin/kueue``, ``crds/*.yaml``,
``webhooks.yaml``, ``conversion.json``) keyed by the version (``$KUBETUNE_KUEUE_VERSION``,
default :data:`PINNED_KUEUE_VERSION`).

Python API (pytest fixtures)::

    sys.path.insert(0, str(REPO / "hack")); import cluster, kueue
    c = cluster.LocalCluster.start()
    k = kueue.Kueue.start(c)          # CRDs, webhooks, the manager on 127.0.0.1; waits until it admits
    k.create(kueue.resource_flavor("default"))
    k.create(kueue.cluster_queue("gpus", "default", gpus=1))
    k.create(kueue.local_queue(ns, "team", "gpus"))
    k.create(kueue.workload_priority_class("high", 1000))
    k.stop()                          # webhook configurations deleted, the manager stopped

How it runs on a control plane without Services, kube-proxy or DNS: the manager is a local
process (admin kubeconfig, leader election off, metrics and the visibility server off, the
``batch/job`` integration only, ``manageJobsWithoutQueueName: false``). Kueue's internal cert
management is disabled: :meth:`Kueue.start` makes a CA and a serving certificate for
``IP:127.0.0.1`` and rewrites every webhook and CRD conversion webhook to
``clientConfig.url: https://127.0.0.1:<port>/<path>`` with that caBundle. Only the webhooks of
the ``kueue.x-k8s.io`` and ``batch`` API groups are installed (the other integrations are off, and
a pod webhook with ``failurePolicy: Fail`` would outlive a stopped manager in a shared cluster).

Without internal cert management Kueue's ``main.go`` loads a metrics certificate from the fixed
path ``/etc/kueue/metrics/certs/tls.{crt,key}`` (even with metrics off); :func:`ensure_metrics_cert`
writes a self-signed one there when it is missing (needs write access to /etc: root, as here and
in CI). The log is ``<cluster run dir>/logs/kueue.log``.
"""

from __future__ import annotations

import argparse
import base64
import copy
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cluster  # noqa: E402  (hack/cluster.py)

PINNED_KUEUE_VERSION = "v0.17.0"
KUEUE_VERSION = os.environ.get("KUBETUNE_KUEUE_VERSION", PINNED_KUEUE_VERSION)
KUEUE_MODULE = "sigs.k8s.io/kueue"
KUEUE_PKG = f"{KUEUE_MODULE}/cmd/kueue"
NAMESPACE = "kueue-system"
API = "/apis/kueue.x-k8s.io/v1beta2"
METRICS_CERT_DIR = Path("/etc/kueue/metrics/certs")  # hard-coded in Kueue's cmd/kueue/main.go
# the webhooks installed: Kueue's own objects and batch/v1 Jobs (the only integration enabled)
WEBHOOK_GROUPS = ("kueue.x-k8s.io", "batch")
WEBHOOK_CONFIGS = {"MutatingWebhookConfiguration": "mutatingwebhookconfigurations",
                   "ValidatingWebhookConfiguration": "validatingwebhookconfigurations"}
ADMISSION = "/apis/admissionregistration.k8s.io/v1"


def _log(msg: str) -> None:
    print(f"[kueue] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- paths
def kueue_dir(version: str = KUEUE_VERSION) -> Path:
    return cluster.cache_dir() / "kueue" / version


def binary(version: str = KUEUE_VERSION) -> Path:
    return kueue_dir(version) / "bin" / "kueue"


def crd_dir(version: str = KUEUE_VERSION) -> Path:
    return kueue_dir(version) / "crds"


def _stamp_text(version: str) -> str:
    return json.dumps({"kueue": version}, sort_keys=True)


def is_built(version: str = KUEUE_VERSION) -> bool:
    d = kueue_dir(version)
    try:
        if (d / ".complete").read_text() != _stamp_text(version):
            return False
    except OSError:
        return False
    return (os.access(binary(version), os.X_OK) and (d / "webhooks.yaml").exists()
            and (d / "conversion.json").exists() and any(crd_dir(version).glob("*.yaml")))


# --------------------------------------------------------------------------- build
def build(version: str = KUEUE_VERSION, force: bool = False) -> Path:
    """Build the manager and copy the manifests into the cache; a no-op when they are there.
    Concurrent callers serialize on a lock file. Returns the cache directory."""
    out = kueue_dir(version)
    if not force and is_built(version):
        return out
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and is_built(version):
            return out
        _build_locked(version, out)
    return out


def _build_locked(version: str, out: Path) -> None:
    t0 = time.monotonic()
    (out / ".complete").unlink(missing_ok=True)
    # manifests: from the module's own config/ tree (the module zip, unpacked in GOMODCACHE)
    env = cluster._go_env("mod")
    info = json.loads(subprocess.run(
        [cluster._go_binary(), "mod", "download", "-json", f"{KUEUE_MODULE}@{version}"],
        cwd=tempfile.gettempdir(), env=env, capture_output=True, text=True, check=False).stdout or "{}")
    if not info.get("Dir") or info.get("Error"):
        raise cluster.BuildError(f"go mod download {KUEUE_MODULE}@{version} failed: {info.get('Error', info)}")
    copy_manifests(Path(info["Dir"]), out)
    # the manager: `go install <pkg>@<version>` (no -mod flag: it builds the module as published)
    tmp = out / ".tmp-bin"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    ienv = cluster._go_env("readonly")
    ienv.update(GOBIN=str(tmp), GOFLAGS="-buildvcs=false")
    jobs = os.environ.get("KUBETUNE_BUILD_JOBS", str(min(os.cpu_count() or 2, 4)))
    ldflags = f"-s -w -X {KUEUE_MODULE}/pkg/version.GitVersion={version}"
    cluster._run_go(["install", "-v", "-p", jobs, "-trimpath", "-ldflags", ldflags, f"{KUEUE_PKG}@{version}"],
                    ienv, Path(tempfile.gettempdir()), f"install kueue {version}")
    (out / "bin").mkdir(exist_ok=True)
    os.replace(tmp / "kueue", binary(version))
    shutil.rmtree(tmp, ignore_errors=True)
    (out / ".complete").write_text(_stamp_text(version))
    _log(f"kueue {version} ready in {out} ({time.monotonic() - t0:.0f}s)")


def copy_manifests(module_dir: Path, out: Path) -> None:
    """CRDs (``config/components/crd/bases``), the CRDs whose conversion webhook
    ``config/components/crd/kustomization.yaml`` enables, and the webhook configurations
    (``config/components/webhook/manifests.yaml``) into ``out``."""
    comp = module_dir / "config" / "components"
    crds = out / "crds"
    shutil.rmtree(crds, ignore_errors=True)
    crds.mkdir(parents=True)
    for f in sorted((comp / "crd" / "bases").glob("*.yaml")):
        shutil.copyfile(f, crds / f.name)
    kustomization = (comp / "crd" / "kustomization.yaml").read_text()
    conversion = []
    for patch in re.findall(r"^- path: (patches/webhook_in_\S+\.yaml)\s*$", kustomization, re.M):
        m = re.search(r"^metadata:\n(?:  .*\n)*?  name: (\S+)", (comp / "crd" / patch).read_text(), re.M)
        if not m:
            raise cluster.BuildError(f"no metadata.name in {comp / 'crd' / patch}")
        conversion.append(m.group(1))
    (out / "conversion.json").write_text(json.dumps(sorted(conversion)))
    shutil.copyfile(comp / "webhook" / "manifests.yaml", out / "webhooks.yaml")


def _loader() -> Any:
    import yaml

    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the Workload CRD is 1 MB


def _yaml_load(text: str) -> Any:
    import yaml

    return yaml.load(text, Loader=_loader())  # noqa: S506 - a safe loader


def _yaml_load_all(text: str) -> list[Any]:
    import yaml

    return [d for d in yaml.load_all(text, Loader=_loader()) if d]  # noqa: S506 - a safe loader


# --------------------------------------------------------------------------- manifests
def webhook_configurations(raw: list[dict], url: str, ca_bundle: str) -> list[dict]:
    """Kueue's webhook configurations for the API server on loopback: named ``kueue-<name>`` as
    its kustomize overlay does, only the webhooks whose rules are in :data:`WEBHOOK_GROUPS`, each
    pointing at ``url + path`` with ``ca_bundle``."""
    out = []
    for doc in raw:
        if doc.get("kind") not in WEBHOOK_CONFIGS:
            continue
        doc = copy.deepcopy(doc)
        doc["metadata"] = {"name": "kueue-" + doc["metadata"]["name"], "labels": {"app.kubernetes.io/name": "kueue"}}
        hooks = []
        for hook in doc.get("webhooks") or []:
            groups = {g for rule in hook.get("rules") or [] for g in rule.get("apiGroups") or []}
            if not groups or not groups <= set(WEBHOOK_GROUPS):
                continue
            path = (hook.get("clientConfig") or {}).get("service", {}).get("path", "/")
            hook["clientConfig"] = {"url": url.rstrip("/") + path, "caBundle": ca_bundle}
            hooks.append(hook)
        doc["webhooks"] = hooks
        out.append(doc)
    return out


def crd_with_conversion(crd: dict, url: str, ca_bundle: str) -> dict:
    crd = copy.deepcopy(crd)
    crd["spec"]["conversion"] = {
        "strategy": "Webhook",
        "webhook": {"clientConfig": {"url": url.rstrip("/") + "/convert", "caBundle": ca_bundle},
                    "conversionReviewVersions": ["v1"]},
    }
    return crd


def manager_config(webhook_port: int, health_port: int, cert_dir: Path) -> dict:
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": "0"},
        "webhook": {"port": webhook_port, "host": "127.0.0.1", "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "manageJobsWithoutQueueName": False,
        "integrations": {"frameworks": ["batch/job"]},
        "featureGates": {"VisibilityOnDemand": False},
        "clientConnection": {"qps": 50, "burst": 100},
    }


# --------------------------------------------------------------------------- objects
def resource_flavor(name: str = "default-flavor", node_labels: dict[str, str] | None = None) -> dict:
    spec = {"nodeLabels": node_labels} if node_labels else {}
    return {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": name},
            "spec": spec}


def cluster_queue(name: str, flavor: str = "default-flavor", gpus: int = 1, cpu: str = "64", memory: str = "512Gi",
                  preemption: str = "LowerPriority") -> dict:
    """A ClusterQueue for every namespace with quota for ``nvidia.com/gpu``, cpu and memory in one
    flavor; ``preemption`` is ``withinClusterQueue`` (``Never`` or ``LowerPriority``...)."""
    return {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "ClusterQueue",
        "metadata": {"name": name},
        "spec": {
            "namespaceSelector": {},
            "queueingStrategy": "BestEffortFIFO",
            "preemption": {"withinClusterQueue": preemption},
            "resourceGroups": [{
                "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                "flavors": [{"name": flavor, "resources": [
                    {"name": "cpu", "nominalQuota": cpu},
                    {"name": "memory", "nominalQuota": memory},
                    {"name": "nvidia.com/gpu", "nominalQuota": gpus},
                ]}],
            }],
        },
    }


def local_queue(namespace: str, name: str, cluster_queue_name: str) -> dict:
    return {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue",
            "metadata": {"name": name, "namespace": namespace}, "spec": {"clusterQueue": cluster_queue_name}}


def workload_priority_class(name: str, value: int, description: str = "") -> dict:
    return {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "WorkloadPriorityClass", "metadata": {"name": name},
            "value": value, "description": description or f"priority {value}"}


PLURALS = {"ResourceFlavor": "resourceflavors", "ClusterQueue": "clusterqueues", "LocalQueue": "localqueues",
           "WorkloadPriorityClass": "workloadpriorityclasses", "Workload": "workloads", "Cohort": "cohorts"}


def object_path(kind: str, name: str | None = None, namespace: str | None = None) -> str:
    path = API + (f"/namespaces/{namespace}" if namespace else "") + f"/{PLURALS[kind]}"
    return path + (f"/{name}" if name else "")


# --------------------------------------------------------------------------- certificates
def _make_certs(d: Path) -> str:
    """CA + serving certificate for IP:127.0.0.1 in ``d`` (tls.crt/tls.key); returns the caBundle."""
    d.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    cluster._openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "3650",
                     "-subj", "/CN=kubetune-kueue-webhook-ca", "-addext", "basicConstraints=critical,CA:TRUE",
                     "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature", cwd=d)
    (d / "tls.ext").write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                               "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    cluster._openssl("req", "-new", *ec, "-keyout", "tls.key", "-out", "tls.csr", "-subj", "/CN=127.0.0.1", cwd=d)
    cluster._openssl("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                     "-days", "3650", "-sha256", "-extfile", "tls.ext", "-out", "tls.crt", cwd=d)
    return base64.b64encode((d / "ca.crt").read_bytes()).decode()


def ensure_metrics_cert(d: Path = METRICS_CERT_DIR) -> None:
    """Kueue without internal cert management reads ``/etc/kueue/metrics/certs/tls.{crt,key}`` at
    start (a fixed path); write a self-signed pair there when it is missing. The metrics server
    itself is off (``metrics.bindAddress: "0"``), so nobody ever verifies it."""
    if (d / "tls.crt").exists() and (d / "tls.key").exists():
        return
    try:
        d.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".kueue-metrics-", dir=d))
    except OSError as err:
        raise cluster.ComponentError(
            "kueue", f"Kueue needs a certificate in {d} (tls.crt, tls.key) and this user cannot write it ({err}); "
                     "create it once as root: sudo python3 hack/kueue.py metrics-cert") from err
    try:
        cluster._openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                         "-keyout", "tls.key", "-out", "tls.crt", "-days", "3650", "-subj", "/CN=kueue-metrics",
                         "-addext", "subjectAltName=IP:127.0.0.1", cwd=tmp)
        os.chmod(tmp / "tls.key", 0o600)
        for name in ("tls.key", "tls.crt"):  # the key first: a reader that sees tls.crt finds both
            os.replace(tmp / name, d / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- the manager
class Kueue:
    """Kueue's controller manager running against a :class:`cluster.LocalCluster`."""

    def __init__(self, c: cluster.LocalCluster, version: str = KUEUE_VERSION) -> None:
        self.cluster = c
        self.version = version
        self.dir = c.run_dir / "kueue"
        self.webhook_port = 0
        self.health_port = 0
        self.proc: subprocess.Popen | None = None
        self.start_time: str | None = None
        self.timings: dict[str, float] = {}
        self.created: list[tuple[str, str, str | None]] = []  # (kind, name, namespace) made by create()
        self.log_level = os.environ.get("KUBETUNE_KUEUE_LOG_LEVEL", "2")  # 2: "Job admitted, unsuspending"

    @property
    def log_file(self) -> Path:
        return self.cluster.log_file("kueue")

    @property
    def webhook_url(self) -> str:
        return f"https://127.0.0.1:{self.webhook_port}"

    @classmethod
    def start(cls, c: cluster.LocalCluster, version: str = KUEUE_VERSION, build_if_needed: bool = True,
              timeout: float = 120.0) -> Kueue:
        """Install the CRDs and webhooks, start the manager and wait until it serves its webhooks.
        Raises :class:`cluster.BuildError` (no build) or :class:`cluster.ComponentError`."""
        if build_if_needed:
            build(version)
        elif not is_built(version):
            raise cluster.BuildError(f"Kueue {version} not built; run: python3 hack/kueue.py build")
        self = cls(c, version)
        try:
            self._start(time.monotonic() + timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, deadline: float) -> None:
        t0 = time.monotonic()
        c, cache = self.cluster, kueue_dir(self.version)
        ensure_metrics_cert()
        ca_bundle = _make_certs(self.dir / "certs")
        self.webhook_port, self.health_port = cluster.free_port(), cluster.free_port()
        self.timings["certs"] = round(time.monotonic() - t0, 2)

        # CRDs, the conversion webhooks pointing at the manager-to-be
        t = time.monotonic()
        convert = set(json.loads((cache / "conversion.json").read_text()))
        out = self.dir / "crds"
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(crd_dir(self.version).glob("*.yaml")):
            crd = _yaml_load(f.read_text())
            if crd["metadata"]["name"] in convert:
                crd = crd_with_conversion(crd, self.webhook_url, ca_bundle)
            (out / f.name).write_text(json.dumps(crd))
        self._apply_crds(out)
        self.timings["crds"] = round(time.monotonic() - t, 2)
        if c.request("GET", f"/api/v1/namespaces/{NAMESPACE}", ok404=True) is None:
            c.request("POST", "/api/v1/namespaces", {"metadata": {"name": NAMESPACE}})

        # the manager
        t = time.monotonic()
        cfg = self.dir / "config.yaml"
        cfg.write_text(json.dumps(manager_config(self.webhook_port, self.health_port, self.dir / "certs")))
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
        env["KUBECONFIG"] = str(c.kubeconfig)
        with open(self.log_file, "ab") as lf:
            self.proc = subprocess.Popen(
                [str(binary(self.version)), f"--config={cfg}", f"--zap-log-level={self.log_level}"],
                cwd=self.dir, env=env, stdin=subprocess.DEVNULL, stdout=lf, stderr=subprocess.STDOUT,
                preexec_fn=cluster._pdeathsig)
        self.start_time = cluster._proc_start_time(self.proc.pid)
        self._wait(lambda: cluster._http(f"http://127.0.0.1:{self.health_port}/readyz", timeout=2)[0] == 200,
                   deadline, "GET /readyz (webhook server started)")
        self.timings["manager ready"] = round(time.monotonic() - t, 2)

        # webhook configurations, once the server answers; then wait until the API server uses them
        t = time.monotonic()
        raw = _yaml_load_all((cache / "webhooks.yaml").read_text())
        for doc in webhook_configurations(raw, self.webhook_url, ca_bundle):
            self._put(f"{ADMISSION}/{WEBHOOK_CONFIGS[doc['kind']]}", doc)
        self._wait(self._job_webhook_active, deadline, "the batch/v1 Job webhook is called")
        self.timings["webhooks"] = round(time.monotonic() - t, 2)
        _log(f"kueue {self.version} ready in {time.monotonic() - t0:.1f}s (webhooks {self.webhook_url}; "
             f"log {self.log_file})")

    def _apply_crds(self, folder: Path) -> None:
        """Create or replace the CRDs (a PUT of the whole object: the conversion's URL and caBundle
        change with every start) and wait until each is Established."""
        names = []
        for f in sorted(folder.glob("*.yaml")):
            crd = json.loads(f.read_text())
            self._put("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
            names.append(crd["metadata"]["name"])
        deadline = time.monotonic() + 60
        for name in names:
            self._wait(lambda n=name: _established(self.cluster.request(
                "GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{n}")), deadline, f"CRD {name}")

    def _put(self, collection: str, obj: dict) -> dict:
        """Create, or replace what is there (keeping its resourceVersion)."""
        c, name = self.cluster, obj["metadata"]["name"]
        try:
            return c.request("POST", collection, obj)
        except cluster.ApiError as err:
            if err.status != 409:
                raise
        current = c.request("GET", f"{collection}/{name}")
        obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": current["metadata"]["resourceVersion"]}}
        return c.request("PUT", f"{collection}/{name}", obj)

    def _job_webhook_active(self) -> bool:
        """A dry-run Job with a queue name comes back suspended: Kueue's mutating webhook ran."""
        job = {"apiVersion": "batch/v1", "kind": "Job",
               "metadata": {"generateName": "kueue-probe-", "labels": {"kueue.x-k8s.io/queue-name": "probe"}},
               "spec": {"suspend": False, "template": {"spec": {
                   "restartPolicy": "Never", "containers": [{"name": "c", "image": "probe"}]}}}}
        out = self.cluster.request("POST", "/apis/batch/v1/namespaces/default/jobs?dryRun=All", job)
        return bool(out["spec"].get("suspend"))

    def _wait(self, check: Any, deadline: float, what: str) -> None:
        last = ""
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                time.sleep(0.2)
                raise cluster.ComponentError("kueue", f"process exited with code {self.proc.returncode}",
                                             cluster._tail(self.log_file, 40))
            try:
                if check():
                    return
            except Exception as e:  # noqa: BLE001 - connection refused etc. while starting
                last = f"{type(e).__name__}: {e}"
            if time.monotonic() > deadline:
                raise cluster.ComponentError("kueue", f"not ready ({what}) before deadline; last error: {last}",
                                             cluster._tail(self.log_file, 40))
            time.sleep(0.2)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Delete the webhook configurations (so that the shared cluster admits Jobs again without
        Kueue), then stop the manager. The CRDs and Kueue objects stay. Idempotent."""
        for doc_kind, plural in WEBHOOK_CONFIGS.items():
            name = "kueue-" + ("mutating" if doc_kind.startswith("Mutating") else "validating") + \
                "-webhook-configuration"
            try:
                self.cluster.request("DELETE", f"{ADMISSION}/{plural}/{name}", ok404=True)
            except Exception as err:  # noqa: BLE001 - the API server may be gone already
                _log(f"cannot delete {plural}/{name}: {err}")
        if self.proc is not None:
            cluster._terminate(self.proc.pid, self.start_time, reap=self.proc)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def __enter__(self) -> Kueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- API helpers (as admin)
    def create(self, obj: dict) -> dict:
        """Create a Kueue object (ResourceFlavor, ClusterQueue, LocalQueue, WorkloadPriorityClass);
        :meth:`delete_created` removes them again."""
        ns = obj["metadata"].get("namespace")
        out = self.cluster.request("POST", object_path(obj["kind"], namespace=ns), obj)
        self.created.append((obj["kind"], obj["metadata"]["name"], ns))
        return out

    def delete_created(self) -> None:
        """Delete what :meth:`create` made, newest first (while the manager runs: it removes the
        finalizers of ClusterQueues and ResourceFlavors no longer in use)."""
        while self.created:
            kind, name, ns = self.created.pop()
            try:
                self.delete(kind, name, ns)
            except Exception as err:  # noqa: BLE001 - best effort
                _log(f"cannot delete {kind} {name}: {err}")

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict | None:
        return self.cluster.request("GET", object_path(kind, name, namespace), ok404=True)

    def delete(self, kind: str, name: str, namespace: str | None = None) -> None:
        self.cluster.request("DELETE", object_path(kind, name, namespace), ok404=True)

    def workloads(self, namespace: str, selector: str | None = None) -> list[dict]:
        path = object_path("Workload", namespace=namespace)
        if selector:
            path += "?labelSelector=" + urllib_quote(selector)
        return list(self.cluster.request("GET", path).get("items") or [])


def urllib_quote(s: str) -> str:
    from urllib.parse import quote

    return quote(s, safe="")


def _established(crd: dict) -> bool:
    return any(c.get("type") == "Established" and c.get("status") == "True"
               for c in (crd.get("status") or {}).get("conditions") or [])


# --------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hack/kueue.py", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build and cache Kueue's manager, CRDs and webhook manifests")
    b.add_argument("--version", default=KUEUE_VERSION)
    b.add_argument("--force", action="store_true")
    sub.add_parser("metrics-cert", help=f"write the self-signed certificate Kueue reads from {METRICS_CERT_DIR}")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build":
            t0 = time.monotonic()
            out = build(args.version, force=args.force)
            _log(f"{out} ({time.monotonic() - t0:.2f}s)")
        else:
            ensure_metrics_cert()
            _log(f"{METRICS_CERT_DIR}/tls.crt")
    except (cluster.BuildError, cluster.ComponentError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
