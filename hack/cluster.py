#!/usr/bin/env python3
"""Real local Kubernetes control plane for kubetune tests and the demo.

Commands (all idempotent)::

    python hack/cluster.py build    # build + cache binaries (no-op, < 1 s, when cached)
    python hack/cluster.py up       # start in the background, state -> $KUBETUNE_CACHE/run/cluster.json
    python hack/cluster.py status   # per-component pid / health; exit 1 if something is down
    python hack/cluster.py env      # prints: export KUBECONFIG=<run dir>/admin.kubeconfig
    python hack/cluster.py down     # stop everything, remove the run dir and the state file

    eval "$(python hack/cluster.py env)"; kubectl get nodes

Binaries live in ``${KUBETUNE_CACHE:-~/.cache/kubetune}/k8s-<version>/bin/``:
kube-apiserver, kube-controller-manager, kube-scheduler and etcd are built by
``go build`` from the wrapper module in ``hack/k8s/`` (requires
``k8s.io/kubernetes`` and replaces every ``k8s.io/<staging>`` module by its
published ``v0.X.Y``); kwok is ``go install``-ed.  Only the Go module proxy is
needed (GOMODCACHE/GOCACHE are kept under ``$KUBETUNE_CACHE/go``).

Python API (pytest fixtures)::

    sys.path.insert(0, str(REPO / "hack")); import cluster
    with cluster.LocalCluster.start() as c:      # or c = LocalCluster.start(); ...; c.stop()
        c.kubeconfig, c.server, c.ca_file         # admin kubeconfig (client cert, system:masters)
        tok = c.create_token("ns", "sa")          # TokenRequest
        kc = c.kubeconfig_for_token(tok)          # kubeconfig path for a non-admin identity
    c = cluster.LocalCluster.attach()             # handle on a cluster started by `up`

Topology: etcd, kube-apiserver (authz Node,RBAC; service-account issuer and
signing key; client-cert auth with a generated CA), kube-controller-manager
(``--use-service-account-credentials``; the controllers in ``KCM_CONTROLLERS``:
job, cronjob, garbage-collector, ttl-after-finished, namespace, serviceaccount(-token),
root-ca publisher, clusterrole-aggregation, replicaset, deployment, statefulset,
daemonset, pod-gc, endpoints(lice), resourcequota, disruption — NOT node-lifecycle),
kube-scheduler, and kwok, all on 127.0.0.1 with random free ports and a temp run
dir (``/tmp/kubetune-k8s-*``; logs in ``<run dir>/logs/<component>.log``).

Nodes: ``gpu-node-1``/``gpu-node-2`` (8x ``nvidia.com/gpu``) and
``cpu-node-1`` are fake nodes managed by kwok (annotation
``kwok.x-k8s.io/node=fake``; kwok runs with ``--manage-all-nodes=false``),
whose default stages make pods Running and Job pods Succeeded.
``runner-node`` (label ``kubetune.dev/runner=true``, 8 GPUs) is NOT managed by
kwok: ``hack/podrunner.py`` plays kubelet for pods bound to it.

With ``real_node=True`` (``up --real-node``) ``runner-node`` is replaced by ``kubetune-node``, run
by a real kubelet with containerd, kube-proxy and CoreDNS (``hack/realnode.py``,
docs/real-node.md); the API server then also listens on the node's bridge address.

Node health choice: the ``node-lifecycle-controller`` is disabled and the
``TaintNodesByCondition`` admission plugin is turned off, so no node is ever
tainted not-ready/unreachable and no pod is evicted because a heartbeat is
missing.  ``runner-node`` is created with a Ready=True condition and stays
schedulable even if nobody heartbeats it; the pod runner may (but need not)
call :meth:`LocalCluster.heartbeat_node` to refresh its Lease / Ready
condition.  Note that runner-node advertises GPUs, so a GPU pod without a
node selector may land on it; select kwok nodes with ``type=kwok`` or the
runner with ``kubetune.dev/runner=true``.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import datetime as _dt
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import realnode  # noqa: E402  (hack/realnode.py: the real node)

HACK_DIR = Path(__file__).resolve().parent
REPO_ROOT = HACK_DIR.parent
WRAPPER_DIR = HACK_DIR / "k8s"

PINNED_K8S_VERSION = "v1.34.4"  # what hack/k8s/go.mod is generated for
K8S_VERSION = os.environ.get("KUBETUNE_K8S_VERSION", PINNED_K8S_VERSION)
KWOK_VERSION = os.environ.get("KUBETUNE_KWOK_VERSION", "v0.8.0")
KWOK_PKG = "sigs.k8s.io/kwok/cmd/kwok"
ETCD_PKG = "go.etcd.io/etcd/server/v3"  # the etcd server main package
KUBE_CMDS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
BINARIES = ("etcd",) + KUBE_CMDS + ("kwok",)
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")

# Controllers the tests/operator need (fewer controllers = faster start; node-lifecycle is
# deliberately absent, see the module docstring).
KCM_CONTROLLERS = (
    "job-controller",
    "cronjob-controller",
    "garbage-collector-controller",
    "ttl-after-finished-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    "clusterrole-aggregation-controller",
    "replicaset-controller",
    "deployment-controller",
    "statefulset-controller",
    "daemonset-controller",
    "pod-garbage-collector-controller",
    "endpoints-controller",
    "endpointslice-controller",
    "resourcequota-controller",
    "disruption-controller",
    "persistentvolume-binder-controller",  # PVCs (spec.modelCache) bind to PersistentVolumes
)
KWOK_ANNOTATION = "kwok.x-k8s.io/node"
RUNNER_NODE = "runner-node"
RUNNER_LABEL = "kubetune.dev/runner"
RUNNER_GPU_MEMORY_MIB = "16384"  # the runner's (and the real node's) GPU memory label: a 16 GB GPU
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"


# --------------------------------------------------------------------------- paths
def cache_dir() -> Path:
    return Path(os.environ.get("KUBETUNE_CACHE") or Path.home() / ".cache" / "kubetune").expanduser()


def bin_dir(version: str = K8S_VERSION) -> Path:
    return cache_dir() / f"k8s-{version}" / "bin"


def state_file() -> Path:
    """``$KUBETUNE_RUN_STATE`` or ``$KUBETUNE_CACHE/run/cluster.json``."""
    return Path(os.environ.get("KUBETUNE_RUN_STATE") or cache_dir() / "run" / "cluster.json")


def _log(msg: str) -> None:
    print(f"[cluster] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- build
class BuildError(RuntimeError):
    pass


def _stamp_text(version: str) -> str:
    return json.dumps({"k8s": version, "kwok": KWOK_VERSION}, sort_keys=True)


def is_built(version: str = K8S_VERSION, real_node: bool = False) -> bool:
    b = bin_dir(version)
    if real_node and not realnode.is_built(b):
        return False
    stamp = b / ".complete"
    try:
        if stamp.read_text() != _stamp_text(version):
            return False
    except OSError:
        return False
    return all(os.access(b / n, os.X_OK) for n in BINARIES)


def _go_binary() -> str:
    go = shutil.which("go") or "/usr/local/go/bin/go"
    if not os.access(go, os.X_OK):
        raise BuildError("go toolchain not found (PATH or /usr/local/go/bin/go)")
    return go


def _go_env(mod_mode: str) -> dict[str, str]:
    c = cache_dir() / "go"
    env = dict(os.environ)
    proxy = os.environ.get("KUBETUNE_GOPROXY") or os.environ.get("GOPROXY") or "https://proxy.golang.org"
    if proxy in ("direct", "off"):
        proxy = "https://proxy.golang.org"
    env.update(
        GOPROXY=proxy,
        # sum.golang.org is reached through the proxy (/sumdb/...), so only the proxy is needed.
        GOSUMDB=os.environ.get("GOSUMDB", "sum.golang.org"),
        GONOSUMDB="",
        GONOSUMCHECK="",
        GOPRIVATE="",
        GONOPROXY="",
        # local toolchain if new enough, otherwise go fetches the one go.mod asks for
        # (golang.org/toolchain through the proxy). Override e.g. KUBETUNE_GOTOOLCHAIN=go1.24.9
        GOTOOLCHAIN=os.environ.get("KUBETUNE_GOTOOLCHAIN", "auto"),
        GOFLAGS=f"-buildvcs=false -mod={mod_mode}",
        CGO_ENABLED="0",
        GOPATH=str(c / "path"),
        GOMODCACHE=str(c / "mod"),
        GOCACHE=str(c / "build"),
        GOWORK="off",
    )
    return env


def _run_go(args: list[str], env: dict[str, str], cwd: Path, what: str, total: int = 0) -> str:
    """Run go, streaming progress: ``go build -v`` prints each package it compiles."""
    _log(f"{what}: go {' '.join(a if len(a) < 80 else a[:77] + '...' for a in args)}")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [_go_binary(), *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    out: list[str] = []
    assert proc.stdout is not None
    last, n = 0.0, 0
    for line in proc.stdout:
        out.append(line)
        now = time.monotonic()
        if line.startswith("go: downloading"):
            n_dl = sum(1 for x in out if x.startswith("go: downloading"))
            if now - last > 10:
                _log(f"{what}: downloading modules ({n_dl}) ... {now - t0:.0f}s")
                last = now
        elif re.match(r"^[\w.-]+(/[\w.~+-]+)*$", line.strip()):
            n += 1
            if now - last > 10:
                frac = f"{n}/{total}" if total else str(n)
                _log(f"{what}: compiled {frac} packages ... {now - t0:.0f}s ({line.strip()})")
                last = now
        else:
            sys.stderr.write(f"    {line}")
    rc = proc.wait()
    if rc != 0:
        raise BuildError(f"{what} failed (rc={rc}):\n{''.join(out[-60:])}")
    _log(f"{what}: done in {time.monotonic() - t0:.0f}s")
    return "".join(out)


def _count_deps(pkgs: list[str], env: dict[str, str], cwd: Path) -> int:
    try:
        r = subprocess.run(
            [_go_binary(), "list", "-deps", *pkgs], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
        )
        return len(r.stdout.split()) if r.returncode == 0 else 0
    except (OSError, subprocess.SubprocessError):
        return 0


def generate_wrapper_module(version: str = K8S_VERSION, directory: Path = WRAPPER_DIR) -> None:
    """(Re)write hack/k8s/go.mod from k8s.io/kubernetes' own go.mod.

    Each ``k8s.io/X => ./staging/src/k8s.io/X`` replace of kubernetes becomes
    ``k8s.io/X => k8s.io/X v0.<minor>.<patch>``; the etcd server version is the
    one kubernetes itself requires.
    """
    env = _go_env("mod")
    directory.mkdir(parents=True, exist_ok=True)
    info = json.loads(
        subprocess.run(
            [_go_binary(), "mod", "download", "-json", f"k8s.io/kubernetes@{version}"],
            cwd=tempfile.gettempdir(),
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    gomod = Path(info["GoMod"]).read_text()
    staging = sorted(set(re.findall(r"^\s*(k8s\.io/[\w.-]+)\s*=>\s*\./staging/", gomod, re.M)))
    if not staging:
        raise BuildError("could not find staging replaces in k8s.io/kubernetes go.mod")
    m = re.search(r"^\s*go\.etcd\.io/etcd/server/v3\s+(v\S+)", gomod, re.M)
    etcd_version = m.group(1) if m else "v3.6.4"
    gover = re.search(r"^go\s+(\S+)", gomod, re.M).group(1)  # type: ignore[union-attr]
    staging_version = "v0." + version.lstrip("v").split(".", 1)[1]
    lines = [
        "// Code generated by `python hack/cluster.py build --regen`; DO NOT EDIT.",
        "// Wrapper module: builds kube-apiserver/controller-manager/scheduler and etcd",
        f"// from k8s.io/kubernetes {version} using only the Go module proxy.",
        "module kubetune.dev/hack/k8s",
        "",
        f"go {gover}",
        "",
        "require (",
        f"\tk8s.io/kubernetes {version}",
        f"\tgo.etcd.io/etcd/server/v3 {etcd_version}",
        ")",
        "",
        "replace (",
        *[f"\t{mod} => {mod} {staging_version}" for mod in staging],
        ")",
        "",
        "tool (",
        *[f"\tk8s.io/kubernetes/cmd/{c}" for c in KUBE_CMDS + ("kubelet", "kube-proxy")],
        f"\t{ETCD_PKG}",
        ")",
        "",
    ]
    (directory / "go.mod").write_text("\n".join(lines))
    (directory / "go.sum").unlink(missing_ok=True)
    _log(f"wrote {directory / 'go.mod'} ({len(staging)} staging replaces, etcd {etcd_version})")


KWOK_STAGE_FILES = (
    "node/fast/node-initialize.yaml",
    "node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "pod/fast/pod-ready.yaml",
    "pod/fast/pod-complete.yaml",
    "pod/fast/pod-delete.yaml",
)
KWOK_STAGES = WRAPPER_DIR / "kwok-stages.yaml"


def generate_kwok_stages(out: Path = KWOK_STAGES) -> None:
    """kwok needs its Stage objects from a config file; take kwokctl's defaults
    (node-fast + node-heartbeat-with-lease + pod-fast) from the kwok module."""
    env = _go_env("mod")
    info = json.loads(
        subprocess.run(
            [_go_binary(), "mod", "download", "-json", f"sigs.k8s.io/kwok@{KWOK_VERSION}"],
            cwd=tempfile.gettempdir(),
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    base = Path(info["Dir"]) / "kustomize" / "stage"
    docs = [
        f"# Code generated by `python hack/cluster.py build --regen` from sigs.k8s.io/kwok@{KWOK_VERSION}\n"
        f"# kustomize/stage/{{{','.join(KWOK_STAGE_FILES)}}} (Apache-2.0); DO NOT EDIT.\n"
    ]
    out.write_text(docs[0] + "---\n".join((base / f).read_text().strip() + "\n" for f in KWOK_STAGE_FILES))


def _version_ldflags(version: str) -> str:
    major, minor = version.lstrip("v").split(".")[:2]
    date = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    flags = ["-s", "-w"]
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {pkg}.gitVersion={version}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
            f"-X {pkg}.buildDate={date}",
        ]
    return " ".join(flags)


def build(version: str = K8S_VERSION, regen: bool = False, force: bool = False, real_node: bool = False) -> Path:
    """Build the binaries into the cache; a no-op when they are already there.

    Concurrent callers (pytest + make) serialize on a lock file; the second one
    finds the binaries built.
    """
    out = bin_dir(version)
    if not force and not regen and is_built(version, real_node):
        return out
    out.mkdir(parents=True, exist_ok=True)
    import fcntl

    with open(out.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and not regen and is_built(version, real_node):
            return out
        if is_built(version) and not force and not regen:  # only the node's binaries are missing
            realnode.build(sys.modules[__name__], out, _wrapper_dir(version), version)
            return out
        _build_locked(version, regen, force, out)
        if real_node:
            realnode.build(sys.modules[__name__], out, _wrapper_dir(version), version)
        return out


def _wrapper_dir(version: str) -> Path:
    """The checked-in wrapper (go.mod + go.sum) is for PINNED_K8S_VERSION; another version gets a
    generated wrapper module in the cache."""
    return WRAPPER_DIR if version == PINNED_K8S_VERSION else cache_dir() / f"k8s-{version}" / "wrapper"


def _system_etcd() -> str | None:
    for cand in (shutil.which("etcd"), "/usr/bin/etcd", "/usr/sbin/etcd"):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def _build_locked(version: str, regen: bool, force: bool, out: Path) -> Path:
    t0 = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    (out / ".complete").unlink(missing_ok=True)
    wrapper = _wrapper_dir(version)
    if regen or not (wrapper / "go.sum").exists():
        generate_wrapper_module(version, wrapper)
        mod_mode = "mod"  # lets go fill go.sum (and the indirect requirements)
    else:
        mod_mode = "readonly"
    env = _go_env(mod_mode)
    jobs = os.environ.get("KUBETUNE_BUILD_JOBS", str(min(os.cpu_count() or 2, 4)))
    if not all(os.access(out / n, os.X_OK) for n in ("etcd",) + KUBE_CMDS) or force or regen:
        tmp = out / ".tmp"
        tmp.mkdir(exist_ok=True)
        pkgs = [f"k8s.io/kubernetes/cmd/{c}" for c in KUBE_CMDS] + [ETCD_PKG]
        total = _count_deps(pkgs, env, wrapper)
        args = ["build", "-v", "-p", jobs, "-trimpath", "-ldflags", _version_ldflags(version), "-o", str(tmp) + "/"]
        try:
            _run_go([*args, *pkgs], env, wrapper, f"build kubernetes {version} + etcd", total)
            os.replace(tmp / "server", out / "etcd")  # go.etcd.io/etcd/server/v3 -> "server"
        except BuildError as e:
            # fallback: kube binaries only + Debian's etcd (apt-get install etcd-server)
            etcd = _system_etcd()
            if etcd is None:
                raise
            _log(f"building etcd failed, using {etcd} instead ({str(e).splitlines()[0]})")
            _run_go([*args, *pkgs[:-1]], env, wrapper, f"build kubernetes {version}", total)
            shutil.copy2(etcd, out / "etcd")
        for c in KUBE_CMDS:
            os.replace(tmp / c, out / c)
        shutil.rmtree(tmp, ignore_errors=True)
    if not os.access(out / "kwok", os.X_OK) or force or regen:
        kenv = _go_env("readonly")
        kenv["GOBIN"] = str(out)
        kenv["GOFLAGS"] = "-buildvcs=false"
        _run_go(
            ["install", "-v", "-p", jobs, "-trimpath", "-ldflags", "-s -w", f"{KWOK_PKG}@{KWOK_VERSION}"],
            kenv,
            Path(tempfile.gettempdir()),
            f"install kwok {KWOK_VERSION}",
        )
    if (regen and version == PINNED_K8S_VERSION) or not KWOK_STAGES.exists():
        generate_kwok_stages()
    ver = subprocess.run([str(out / "kube-apiserver"), "--version"], capture_output=True, text=True).stdout.strip()
    if version not in ver:
        raise BuildError(f"kube-apiserver --version printed {ver!r}, expected {version}")
    (out / ".complete").write_text(_stamp_text(version))
    _log(f"binaries ready in {out} ({time.monotonic() - t0:.0f}s)")
    return out


# --------------------------------------------------------------------------- PKI
def _openssl(*args: str, cwd: Path) -> None:
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {r.stderr}")


def _make_pki(pki: Path, real_node: bool = False) -> None:
    """CA, apiserver serving cert, client certs, service-account signing key (all ECDSA P-256).
    With ``real_node``: the kubelet's client and serving certs, kube-proxy's, CoreDNS's and the API
    server's client cert for the kubelet (logs, exec), and the node IP in the API server's cert."""
    pki.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "3650",
        "-subj",
        "/CN=kubetune-local-ca",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        cwd=pki,
    )
    san = (
        "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
        "DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
    )
    if real_node:
        san += f",IP:{realnode.NODE_IP}"
    certs = {
        "apiserver": ("/CN=kube-apiserver", f"{san}\nextendedKeyUsage=serverAuth\n"),
        "admin": ("/O=system:masters/CN=kubetune-admin", "extendedKeyUsage=clientAuth\n"),
        "controller-manager": ("/CN=system:kube-controller-manager", "extendedKeyUsage=clientAuth\n"),
        "scheduler": ("/CN=system:kube-scheduler", "extendedKeyUsage=clientAuth\n"),
    }
    if real_node:
        certs.update({
            "kubelet": (f"/O=system:nodes/CN=system:node:{realnode.NODE_NAME}", "extendedKeyUsage=clientAuth\n"),
            "kubelet-serving": (
                f"/CN={realnode.NODE_NAME}",
                f"subjectAltName=IP:{realnode.NODE_IP},DNS:{realnode.NODE_NAME}\nextendedKeyUsage=serverAuth\n",
            ),
            "kube-proxy": ("/CN=system:kube-proxy", "extendedKeyUsage=clientAuth\n"),
            # the bootstrap policy has no role for CoreDNS; a local DNS server may read as admin
            "coredns": ("/O=system:masters/CN=coredns", "extendedKeyUsage=clientAuth\n"),
            "apiserver-kubelet-client": ("/O=system:masters/CN=kube-apiserver-kubelet-client",
                                         "extendedKeyUsage=clientAuth\n"),
        })
    for name, (subj, ext) in certs.items():
        (pki / f"{name}.ext").write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n" + ext
        )
        _openssl("req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subj, cwd=pki)
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "3650",
            "-sha256",
            "-extfile",
            f"{name}.ext",
            "-out",
            f"{name}.crt",
            cwd=pki,
        )
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "sa.key", cwd=pki)
    _openssl("ec", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def _b64file(p: Path) -> str:
    return base64.b64encode(p.read_bytes()).decode()


def _kubeconfig_text(server: str, ca_file: Path, user: str, user_fields: dict[str, str]) -> str:
    fields = "".join(f"    {k}: {v}\n" for k, v in user_fields.items())
    return (
        "apiVersion: v1\nkind: Config\n"
        "clusters:\n- name: kubetune\n  cluster:\n"
        f"    server: {server}\n    certificate-authority-data: {_b64file(ca_file)}\n"
        f"contexts:\n- name: {user}@kubetune\n  context:\n    cluster: kubetune\n    user: {user}\n"
        f"current-context: {user}@kubetune\n"
        f"users:\n- name: {user}\n  user:\n{fields}"
    )


# --------------------------------------------------------------------------- processes
class ComponentError(RuntimeError):
    """A control-plane component failed to start; ``.component`` names it."""

    def __init__(self, component: str, reason: str, log_tail: str = "") -> None:
        self.component = component
        self.log_tail = log_tail
        self.run_dir: Path | None = None
        self.processes: dict[str, dict] = {}  # what had been started (all stopped again)
        msg = f"{component} failed to start: {reason}"
        if log_tail:
            msg += f"\n--- last lines of {component} log ---\n{log_tail}"
        super().__init__(msg)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path | str, n: int = 30) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 64 * 1024))
            return "\n".join(f.read().decode(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _proc_start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start_time: str | None) -> bool:
    st = _proc_start_time(pid)
    if st is None:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
    except OSError:
        return False
    return start_time is None or st == start_time


def _pdeathsig() -> None:  # runs in the child between fork and exec
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _terminate(pid: int, start_time: str | None, timeout: float = 10.0, reap: subprocess.Popen | None = None) -> None:
    if not _alive(pid, start_time):
        if reap is not None:
            reap.poll()
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)  # each component is its own session / process group leader
        except ProcessLookupError:
            pass
        except PermissionError:
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if reap is not None and reap.poll() is not None:
                return
            if not _alive(pid, start_time):
                return
            time.sleep(0.05)


# --------------------------------------------------------------------------- HTTP
class ApiError(RuntimeError):
    def __init__(self, status: int, body: str, method: str, path: str) -> None:
        self.status = status
        self.body = body
        super().__init__(f"{method} {path} -> {status}: {body[:500]}")


def _http(
    url: str,
    ctx: ssl.SSLContext | None = None,
    method: str = "GET",
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> tuple[int, str]:
    data = None
    hdrs = {"Accept": "application/json"}
    if body is not None:
        data = json.dumps(body).encode()
        hdrs["Content-Type"] = "application/json"
    hdrs.update(headers or {})
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def _insecure_ctx() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# --------------------------------------------------------------------------- nodes
def _gpu_node(name: str) -> dict:
    return _node(
        name,
        cpu="32",
        memory="256Gi",
        gpus=8,
        kwok=True,
        labels={
            "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.count": "8",
            "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
            "nvidia.com/gpu.memory": "81559",  # MiB, as GPU feature discovery labels an H100 80GB
            "node.kubernetes.io/instance-type": "kwok-gpu-8x",
        },
    )


def _node(
    name: str, cpu: str, memory: str, gpus: int, kwok: bool, labels: dict[str, str], taints: list[dict] | None = None
) -> dict:
    cap = {"cpu": cpu, "memory": memory, "pods": "110", "ephemeral-storage": "1Ti"}
    if gpus:
        cap["nvidia.com/gpu"] = str(gpus)
    all_labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "type": "kwok" if kwok else "runner",
        **labels,
    }
    node: dict = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": all_labels,
            "annotations": {KWOK_ANNOTATION: "fake"} if kwok else {"kubetune.dev/managed-by": "podrunner"},
        },
        "spec": {"taints": taints} if taints else {},
        "status": {
            "capacity": cap,
            "allocatable": dict(cap),
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": "kwok" if kwok else "kubetune-podrunner",
            },
        },
    }
    if not kwok:
        now = _now()
        node["status"]["addresses"] = [
            {"type": "InternalIP", "address": "127.0.0.1"},
            {"type": "Hostname", "address": name},
        ]
        node["status"]["conditions"] = [
            {
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "kubetune pod runner node",
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }
        ]
    return node


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def default_nodes(runner_taints: list[dict] | None = None) -> list[dict]:
    return [
        _gpu_node("gpu-node-1"),
        _gpu_node("gpu-node-2"),
        _node(
            "cpu-node-1",
            cpu="16",
            memory="64Gi",
            gpus=0,
            kwok=True,
            labels={"node.kubernetes.io/instance-type": "kwok-cpu"},
        ),
        _node(
            RUNNER_NODE,
            cpu="16",
            memory="64Gi",
            gpus=8,
            kwok=False,
            labels={RUNNER_LABEL: "true", "nvidia.com/gpu.present": "true", "nvidia.com/gpu.count": "8",
                    "nvidia.com/gpu.memory": RUNNER_GPU_MEMORY_MIB},
            taints=runner_taints,
        ),
    ]


# --------------------------------------------------------------------------- cluster
class LocalCluster:
    """A running local control plane.  Use :meth:`start` (or :meth:`attach`)."""

    def __init__(
        self,
        run_dir: Path,
        ports: dict[str, int],
        processes: dict[str, dict],
        version: str = K8S_VERSION,
        owned: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.ports = ports
        self.processes = processes  # name -> {"pid", "start_time", "log"}
        self.version = version
        self.owned = owned
        self._popen: dict[str, subprocess.Popen] = {}
        self._stopped = False
        self.timings: dict[str, float] = {}  # startup phase -> seconds
        self._background = False
        self.real_node = False  # kubelet + containerd + kube-proxy + CoreDNS (hack/realnode.py)
        self._args: dict[str, tuple[str, list[str]]] = {}  # name -> (exe, args) as spawned (for restarts)

    # -- well-known paths
    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['kube-apiserver']}"

    @property
    def kubeconfig(self) -> Path:
        return self.run_dir / "admin.kubeconfig"

    @property
    def ca_file(self) -> Path:
        return self.run_dir / "pki" / "ca.crt"

    @property
    def admin_cert(self) -> Path:
        return self.run_dir / "pki" / "admin.crt"

    @property
    def admin_key(self) -> Path:
        return self.run_dir / "pki" / "admin.key"

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['etcd']}"

    def log_file(self, component: str) -> Path:
        return self.run_dir / "logs" / f"{component}.log"

    @property
    def audit_log(self) -> Path:
        """The API server's audit log: one JSON event (level Metadata: user, verb, requestURI,
        userAgent, response code) per request made with a ServiceAccount token outside kube-system,
        i.e. by the operator and the pods under test, not by the control plane itself."""
        return self.run_dir / "logs" / "audit.log"

    def audit_events(self, username: str | None = None) -> list[dict]:
        """The audit log's events (completed requests), optionally only ``username``'s."""
        if not self.audit_log.exists():
            return []
        events = []
        for line in self.audit_log.read_text(errors="replace").splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue  # a line being written
            if ev.get("stage") == "ResponseComplete" and (
                username is None or (ev.get("user") or {}).get("username") == username
            ):
                events.append(ev)
        return events

    def env(self) -> dict[str, str]:
        return {"KUBECONFIG": str(self.kubeconfig)}

    def __repr__(self) -> str:
        return f"LocalCluster(server={self.server!r}, run_dir={str(self.run_dir)!r})"

    # -- lifecycle
    @classmethod
    def start(
        cls,
        *,
        version: str = K8S_VERSION,
        build_if_needed: bool = True,
        background: bool = False,
        extra_args: dict[str, list[str]] | None = None,
        port_overrides: dict[str, int] | None = None,
        nodes: list[dict] | None = None,
        runner_taints: list[dict] | None = None,
        timeout: float = 90.0,
        keep_run_dir_on_failure: bool = False,
        real_node: bool = False,
    ) -> LocalCluster:
        """Start etcd, kube-apiserver, controller-manager, scheduler and kwok; wait until ready.

        ``real_node=True`` adds a node run by a real kubelet with containerd, kube-proxy and CoreDNS
        (:mod:`realnode`; root, Debian packages and the images of ``hack/images.sh``) instead of the
        pod runner's ``runner-node``; kwok's fake nodes stay.

        ``background=True`` (used by ``up``) detaches the components so they outlive this
        process; otherwise they get SIGTERM (PR_SET_PDEATHSIG) when the thread that called
        ``start`` exits, so call it from the main thread.  ``extra_args`` /
        ``port_overrides`` are test hooks (keyed by component name).
        Raises :class:`ComponentError` naming the component that failed.
        """
        if build_if_needed:
            build(version, real_node=real_node)
        elif not is_built(version, real_node=real_node):
            raise BuildError(f"binaries for {version} not built; run: python hack/cluster.py build")
        t0 = time.monotonic()
        for attempt in range(3):
            try:
                self = cls._start_once(
                    version,
                    background,
                    extra_args or {},
                    port_overrides or {},
                    nodes if nodes is not None else default_nodes(runner_taints),
                    timeout,
                    keep_run_dir_on_failure,
                    real_node,
                )
                break
            except ComponentError as e:
                # a "free" port can be grabbed by someone else before the component binds it
                racy = "address already in use" in str(e).lower() and e.component not in (port_overrides or {})
                if not racy or attempt == 2:
                    raise
                _log(f"{e.component}: port taken meanwhile, retrying with new ports")
        _log(f"cluster ready in {time.monotonic() - t0:.1f}s: {self.server} (KUBECONFIG={self.kubeconfig})")
        if os.environ.get("KUBETUNE_CLUSTER_DEBUG"):
            _log(f"startup phases: {json.dumps(self.timings)}")
        return self

    @classmethod
    def _start_once(
        cls,
        version: str,
        background: bool,
        extra_args: dict[str, list[str]],
        port_overrides: dict[str, int],
        nodes: list[dict],
        timeout: float,
        keep_run_dir_on_failure: bool,
        real_node: bool = False,
    ) -> LocalCluster:
        run_dir = Path(tempfile.mkdtemp(prefix="kubetune-k8s-"))
        ports = {
            "etcd": free_port(),
            "etcd-peer": free_port(),
            "kube-apiserver": free_port(),
            "kube-controller-manager": free_port(),
            "kube-scheduler": free_port(),
            "kwok": free_port(),
        }
        ports.update(port_overrides)
        self = cls(run_dir, ports, {}, version=version)
        self._background = background
        self.real_node = real_node
        if real_node:
            nodes = [n for n in nodes if n["metadata"]["name"] != RUNNER_NODE]  # the kubelet's node replaces it
            timeout += 60
        try:
            self._start(extra_args, nodes, time.monotonic() + timeout)
        except BaseException as e:
            self.stop(remove_run_dir=not keep_run_dir_on_failure)
            if isinstance(e, ComponentError):
                e.run_dir = run_dir
                e.processes = dict(self.processes)
            raise
        return self

    def _spawn(self, name: str, args: list[str], extra: dict[str, list[str]]) -> subprocess.Popen:
        return self._spawn_exe(name, str(bin_dir(self.version) / name), [*args, *extra.get(name, [])])

    def _spawn_exe(self, name: str, exe: str, args: list[str]) -> subprocess.Popen:
        log = self.log_file(name)
        log.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(exe, os.X_OK):
            raise ComponentError(name, f"binary {exe} missing; run: python hack/cluster.py build")
        with open(log, "ab") as lf:
            p = subprocess.Popen(
                [exe, *args],
                cwd=self.run_dir,
                stdin=subprocess.DEVNULL,
                stdout=lf,
                stderr=subprocess.STDOUT,
                start_new_session=self._background,
                preexec_fn=None if self._background else _pdeathsig,
            )
        self._popen[name] = p
        self.processes[name] = {"pid": p.pid, "start_time": _proc_start_time(p.pid), "log": str(log)}
        self._args[name] = (exe, list(args))
        return p

    def _wait(self, name: str, check, deadline: float, what: str) -> None:
        t0 = time.monotonic()
        try:
            self._wait_inner(name, check, deadline, what)
        finally:
            self.timings[f"{name}: {what}"] = round(time.monotonic() - t0, 2)

    def _wait_inner(self, name: str, check, deadline: float, what: str) -> None:
        last_err = ""
        while True:
            p = self._popen.get(name)
            if p is not None and p.poll() is not None:
                time.sleep(0.2)  # let it flush its log
                raise ComponentError(name, f"process exited with code {p.returncode}", _tail(self.log_file(name)))
            try:
                if check():
                    return
            except Exception as e:  # noqa: BLE001 - connection refused etc. while starting
                last_err = f"{type(e).__name__}: {e}"
            if time.monotonic() > deadline:
                raise ComponentError(
                    name, f"not ready ({what}) before deadline; last error: {last_err}", _tail(self.log_file(name))
                )
            time.sleep(0.1)

    def _start(self, extra: dict[str, list[str]], nodes: list[dict], deadline: float) -> None:
        rd, pki, p = self.run_dir, self.run_dir / "pki", self.ports
        t0 = time.monotonic()
        _make_pki(pki, self.real_node)
        self.timings["pki"] = round(time.monotonic() - t0, 2)
        self.kubeconfig.write_text(
            _kubeconfig_text(
                self.server,
                self.ca_file,
                "kubetune-admin",
                {
                    "client-certificate-data": _b64file(pki / "admin.crt"),
                    "client-key-data": _b64file(pki / "admin.key"),
                },
            )
        )
        node_users = ("kubelet", "kube-proxy", "coredns") if self.real_node else ()
        for comp in ("controller-manager", "scheduler", *node_users):
            (rd / f"{comp}.kubeconfig").write_text(
                _kubeconfig_text(
                    self.server,
                    self.ca_file,
                    comp,
                    {"client-certificate": str(pki / f"{comp}.crt"), "client-key": str(pki / f"{comp}.key")},
                )
            )

        # etcd
        self._spawn(
            "etcd",
            [
                "--name=kubetune",
                f"--data-dir={rd / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{p['etcd']}",
                f"--advertise-client-urls=http://127.0.0.1:{p['etcd']}",
                f"--listen-peer-urls=http://127.0.0.1:{p['etcd-peer']}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{p['etcd-peer']}",
                f"--initial-cluster=kubetune=http://127.0.0.1:{p['etcd-peer']}",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
                "--quota-backend-bytes=2147483648",
            ],
            extra,
        )
        self._wait("etcd", lambda: _http(f"{self.etcd_url}/health", timeout=2)[0] == 200, deadline, "GET /health")

        # kube-apiserver
        self._spawn(
            "kube-apiserver",
            [
                f"--etcd-servers={self.etcd_url}",
                f"--secure-port={p['kube-apiserver']}",
                f"--cert-dir={pki}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                "--authorization-mode=Node,RBAC",
                # front-proxy CA published for the delegated authn of kcm/scheduler (no proxy client cert is issued)
                f"--requestheader-client-ca-file={pki / 'ca.crt'}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--service-account-issuer={SA_ISSUER}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--service-cluster-ip-range=10.96.0.0/16",
                "--allow-privileged=true",
                "--disable-admission-plugins=TaintNodesByCondition",
                "--profiling=false",
                "--v=0",
                f"--audit-policy-file={self._audit_policy()}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-format=json",
                "--audit-log-maxbackup=1",
                *self._apiserver_node_args(),
            ],
            extra,
        )
        self._wait("kube-apiserver", lambda: self._readyz(), deadline, "GET /readyz")

        # controller-manager, scheduler
        self._spawn(
            "kube-controller-manager",
            [
                f"--kubeconfig={rd / 'controller-manager.kubeconfig'}",
                f"--authentication-kubeconfig={rd / 'controller-manager.kubeconfig'}",
                f"--authorization-kubeconfig={rd / 'controller-manager.kubeconfig'}",
                "--bind-address=127.0.0.1",
                f"--secure-port={p['kube-controller-manager']}",
                f"--cert-dir={rd / 'kcm-certs'}",
                "--leader-elect=false",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                f"--cluster-signing-cert-file={pki / 'ca.crt'}",
                f"--cluster-signing-key-file={pki / 'ca.key'}",
                f"--controllers={','.join(KCM_CONTROLLERS)}",
                "--kube-api-qps=200",
                "--kube-api-burst=400",
                "--profiling=false",
                "--v=0",
            ],
            extra,
        )
        self._spawn(
            "kube-scheduler",
            [
                f"--kubeconfig={rd / 'scheduler.kubeconfig'}",
                f"--authentication-kubeconfig={rd / 'scheduler.kubeconfig'}",
                f"--authorization-kubeconfig={rd / 'scheduler.kubeconfig'}",
                "--bind-address=127.0.0.1",
                f"--secure-port={p['kube-scheduler']}",
                f"--cert-dir={rd / 'scheduler-certs'}",
                "--leader-elect=false",
                "--profiling=false",
                "--v=0",
            ],
            extra,
        )

        # nodes first, so kwok finds them right away
        for node in nodes:
            self._wait(
                "kube-apiserver",
                lambda n=node: self._create_node(n),
                deadline,
                f"create node {node['metadata']['name']}",
            )

        self._spawn(
            "kwok",
            [
                f"--kubeconfig={self.kubeconfig}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fake",
                "--node-ip=127.0.0.1",
                "--cidr=10.244.0.0/16",
                f"--server-address=127.0.0.1:{p['kwok']}",
                "--node-lease-duration-seconds=40",
                f"--config={KWOK_STAGES}",
            ],
            extra,
        )

        ins = _insecure_ctx()
        for comp in ("kube-controller-manager", "kube-scheduler"):
            self._wait(
                comp,
                lambda c=comp: _http(f"https://127.0.0.1:{p[c]}/healthz", ins, timeout=2)[0] == 200,
                deadline,
                "GET /healthz",
            )
        self._wait(
            "kwok",
            lambda: _http(f"http://127.0.0.1:{p['kwok']}/healthz", timeout=2)[0] == 200,
            deadline,
            "GET /healthz",
        )
        kwok_nodes = [n["metadata"]["name"] for n in nodes if KWOK_ANNOTATION in n["metadata"].get("annotations", {})]
        self._wait("kwok", lambda: all(self._node_ready(n) for n in kwok_nodes), deadline, "kwok nodes Ready")
        # the serviceaccount controller has run when `default` exists (pods need it for admission)
        self._wait(
            "kube-controller-manager",
            lambda: self.request("GET", "/api/v1/namespaces/default/serviceaccounts/default", ok404=True) is not None,
            deadline,
            "default ServiceAccount created",
        )
        if self.real_node:
            realnode.start(self, deadline, self.pause_image())

    def _audit_policy(self) -> Path:
        policy = self.run_dir / "audit-policy.yaml"
        policy.write_text(json.dumps({
            "apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"],
            "rules": [
                {"level": "None", "userGroups": ["system:serviceaccounts:kube-system"]},
                {"level": "Metadata", "userGroups": ["system:serviceaccounts"]},
                {"level": "None"},
            ]}))
        return policy

    def restart_apiserver(self, down_seconds: float = 0.0, timeout: float = 60.0) -> None:
        """Stop kube-apiserver (SIGTERM), stay down ``down_seconds``, start it again with the same
        arguments and wait for /readyz: every watch breaks, clients see connection errors (a fault
        for tests; etcd keeps the state)."""
        info = self.processes["kube-apiserver"]
        _terminate(info["pid"], info.get("start_time"), reap=self._popen.get("kube-apiserver"))
        time.sleep(down_seconds)
        exe, args = self._args["kube-apiserver"]
        self._spawn_exe("kube-apiserver", exe, args)
        self._wait("kube-apiserver", lambda: self._readyz(), time.monotonic() + timeout, "GET /readyz")

    def _apiserver_node_args(self) -> list[str]:
        """Loopback only, no endpoints for the `kubernetes` Service -- unless a real node runs pods,
        which reach the API server through that Service at the node's address."""
        if not self.real_node:
            return ["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", "--endpoint-reconciler-type=none"]
        pki = self.run_dir / "pki"
        return [
            "--bind-address=0.0.0.0",
            f"--advertise-address={realnode.NODE_IP}",
            "--endpoint-reconciler-type=lease",
            "--kubelet-preferred-address-types=InternalIP",
            f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
        ]

    @staticmethod
    def pause_image() -> str:
        """The sandbox image ``hack/images.sh`` built (``$KUBETUNE_CACHE/images/images.env``)."""
        env = cache_dir() / "images" / "images.env"
        for line in env.read_text().splitlines() if env.exists() else []:
            if line.startswith("PAUSE_IMAGE="):
                return line.split("=", 1)[1].strip()
        raise ComponentError("containerd", f"no sandbox image: {env} has no PAUSE_IMAGE; run: bash hack/images.sh")

    def _readyz(self) -> bool:
        return _http(f"{self.server}/readyz", self.ssl_context(), timeout=2)[0] == 200

    def _create_node(self, node: dict) -> bool:
        try:
            self.request("POST", "/api/v1/nodes", node)
        except ApiError as e:
            if e.status != 409:
                raise
        return True

    def _node_ready(self, name: str) -> bool:
        node = self.request("GET", f"/api/v1/nodes/{name}")
        return any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in node.get("status", {}).get("conditions", []) or []
        )

    def stop(self, remove_run_dir: bool = True) -> None:
        """Stop all components (reverse order) and delete the run dir.  Idempotent."""
        if self._stopped:
            return
        for name in ("coredns", "kube-proxy", "kubelet"):
            info = self.processes.get(name)
            if info:
                _terminate(info["pid"], info.get("start_time"), reap=self._popen.get(name))
        if "containerd" in self.processes:
            realnode.cleanup(self.run_dir)
            info = self.processes["containerd"]
            _terminate(info["pid"], info.get("start_time"), reap=self._popen.get("containerd"))
            realnode.stop_leftover_shims()
        for name in reversed(COMPONENTS):
            info = self.processes.get(name)
            if info:
                _terminate(info["pid"], info.get("start_time"), reap=self._popen.get(name))
        for p in self._popen.values():
            try:
                p.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        if remove_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        self._stopped = True

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- state file (for `up` / `down` / attach)
    def to_state(self) -> dict:
        return {
            "version": self.version,
            "run_dir": str(self.run_dir),
            "server": self.server,
            "kubeconfig": str(self.kubeconfig),
            "ca_file": str(self.ca_file),
            "ports": self.ports,
            "processes": self.processes,
            "real_node": self.real_node,
        }

    @classmethod
    def attach(cls, path: Path | str | None = None) -> LocalCluster:
        """Handle on the cluster described by the state file written by ``up``."""
        st = json.loads(Path(path or state_file()).read_text())
        c = cls(Path(st["run_dir"]), st["ports"], st["processes"], version=st.get("version", K8S_VERSION), owned=False)
        c.real_node = bool(st.get("real_node"))
        return c

    def component_status(self) -> dict[str, bool]:
        return {n: _alive(i["pid"], i.get("start_time")) for n, i in self.processes.items()}

    # -- API helpers
    def ssl_context(self, client_cert: bool = True) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        if client_cert:
            ctx.load_cert_chain(str(self.admin_cert), str(self.admin_key))
        return ctx

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = None,
        ok404: bool = False,
        content_type: str | None = None,
    ) -> Any:
        """Minimal REST call as admin (or as ``token``); returns parsed JSON."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if content_type:
            headers["Content-Type"] = content_type
        status, text = _http(self.server + path, self.ssl_context(client_cert=token is None), method, body, headers)
        if status == 404 and ok404:
            return None
        if status >= 300:
            raise ApiError(status, text, method, path)
        return json.loads(text) if text else {}

    def create_token(
        self,
        namespace: str,
        service_account: str,
        audiences: Iterable[str] | None = None,
        expiration_seconds: int = 3600,
    ) -> str:
        """Mint a token for a ServiceAccount via the TokenRequest API."""
        spec: dict = {"expirationSeconds": expiration_seconds}
        if audiences:
            spec["audiences"] = list(audiences)
        r = self.request(
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
        )
        return r["status"]["token"]

    def kubeconfig_for_token(self, token: str, path: Path | str | None = None, name: str = "token-user") -> Path:
        """Write a kubeconfig that authenticates with ``token`` (e.g. a ServiceAccount's)."""
        if path is None:
            fd, tmp = tempfile.mkstemp(prefix="token-", suffix=".kubeconfig", dir=self.run_dir)
            os.close(fd)
            path = tmp
        path = Path(path)
        path.write_text(_kubeconfig_text(self.server, self.ca_file, name, {"token": token}))
        path.chmod(0o600)
        return path

    def heartbeat_node(self, name: str = RUNNER_NODE, ready: bool = True) -> None:
        """Refresh a node's Ready condition and its kube-node-lease Lease (for the pod runner)."""
        now = _now()
        status = "True" if ready else "False"
        cond = {
            "type": "Ready",
            "status": status,
            "reason": "KubeletReady" if ready else "KubeletNotReady",
            "message": "kubetune pod runner",
            "lastHeartbeatTime": now,
        }
        node = self.request("GET", f"/api/v1/nodes/{name}")
        conds = [c for c in node.get("status", {}).get("conditions", []) or [] if c.get("type") != "Ready"]
        old = next((c for c in node.get("status", {}).get("conditions", []) or [] if c.get("type") == "Ready"), None)
        cond["lastTransitionTime"] = old["lastTransitionTime"] if old and old.get("status") == status else now
        self.request(
            "PATCH",
            f"/api/v1/nodes/{name}/status",
            {"status": {"conditions": conds + [cond]}},
            content_type="application/merge-patch+json",
        )
        micro = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        lease = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": micro},
        }
        try:
            self.request("POST", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", lease)
        except ApiError as e:
            if e.status != 409:
                raise
            self.request(
                "PATCH",
                f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}",
                {"spec": lease["spec"]},
                content_type="application/merge-patch+json",
            )

    def install_crds(self, folder: Path | str) -> None:
        """``kubectl apply --server-side`` every CRD in ``folder`` and wait until each is Established."""
        crds = sorted(Path(folder).glob("*.yaml"))
        for crd in crds:
            self.kubectl("apply", "--server-side", "-f", str(crd))
        for crd in crds:
            self.kubectl("wait", "--for=condition=Established", "-f", str(crd), "--timeout=60s")

    def kubectl(
        self, *args: str, token: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        """Run kubectl against this cluster (as admin, or as ``token``)."""
        cmd = [shutil.which("kubectl") or "kubectl", f"--kubeconfig={self.kubeconfig}"]
        if token:
            cmd = [cmd[0], f"--kubeconfig={self.kubeconfig_for_token(token)}"]
        return subprocess.run([*cmd, *args], capture_output=True, text=True, check=check, timeout=timeout)


def kubeconfig_for_token(token: str, path: Path | str | None = None, cluster: LocalCluster | None = None) -> Path:
    """Module-level helper: kubeconfig for ``token`` against ``cluster`` (default: the one from ``up``)."""
    return (cluster or LocalCluster.attach()).kubeconfig_for_token(token, path)


# --------------------------------------------------------------------------- CLI
def _load_state() -> LocalCluster | None:
    try:
        return LocalCluster.attach()
    except (OSError, ValueError, KeyError):
        return None


def cmd_up(args: argparse.Namespace) -> int:
    existing = _load_state()
    if existing is not None:
        if all(existing.component_status().values()) and existing.run_dir.exists():
            _log(f"already up: {existing.server}")
            print(f"export KUBECONFIG={existing.kubeconfig}")
            return 0
        _log("stale state file found; cleaning up")
        existing.stop()
        state_file().unlink(missing_ok=True)
    c = LocalCluster.start(background=True, timeout=args.timeout, real_node=args.real_node)
    sf = state_file()
    sf.parent.mkdir(parents=True, exist_ok=True)
    tmp = sf.with_suffix(".tmp")
    tmp.write_text(json.dumps(c.to_state(), indent=2))
    os.replace(tmp, sf)
    _log(f"state: {sf}")
    print(f"export KUBECONFIG={c.kubeconfig}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    c = _load_state()
    if c is None:
        _log("not running (no state file)")
        return 0
    c.stop()
    state_file().unlink(missing_ok=True)
    _log("stopped")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    c = _load_state()
    if c is None:
        print("not running")
        return 1
    ok = True
    for name, alive in c.component_status().items():
        ok &= alive
        print(
            f"{name:24} pid={c.processes[name]['pid']:<8} {'running' if alive else 'DEAD'}  "
            f"port={c.ports.get(name, '-')}"
        )
    try:
        ready = c._readyz()
    except Exception:  # noqa: BLE001
        ready = False
    ok &= ready
    print(f"{'apiserver /readyz':24} {'ok' if ready else 'FAIL'}  {c.server}")
    print(f"KUBECONFIG={c.kubeconfig}")
    return 0 if ok else 1


def cmd_env(args: argparse.Namespace) -> int:
    c = _load_state()
    if c is None:
        _log("not running; run: python hack/cluster.py up")
        return 1
    print(f"export KUBECONFIG={c.kubeconfig}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    out = build(args.version, regen=args.regen, force=args.force, real_node=args.real_node)
    _log(f"{out} ({time.monotonic() - t0:.2f}s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hack/cluster.py", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build and cache the binaries")
    b.add_argument("--version", default=K8S_VERSION)
    b.add_argument("--regen", action="store_true", help="regenerate hack/k8s/go.mod from k8s.io/kubernetes' go.mod")
    b.add_argument("--force", action="store_true")
    b.add_argument("--real-node", action="store_true", help="also kubelet, kube-proxy and CoreDNS")
    u = sub.add_parser("up", help="start the cluster in the background")
    u.add_argument("--timeout", type=float, default=120.0)
    u.add_argument("--real-node", action="store_true", help="a node run by a real kubelet (hack/realnode.py)")
    sub.add_parser("down", help="stop the cluster")
    sub.add_parser("status", help="show component status")
    sub.add_parser("env", help="print export KUBECONFIG=...")
    args = ap.parse_args(argv)
    fn = {"build": cmd_build, "up": cmd_up, "down": cmd_down, "status": cmd_status, "env": cmd_env}[args.cmd]
    try:
        return fn(args)
    except (ComponentError, BuildError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
