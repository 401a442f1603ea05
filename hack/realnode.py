"""A real Kubernetes node for the local cluster: kubelet + containerd + runc, kube-proxy, CoreDNS.

``hack/cluster.py`` starts it with ``LocalCluster.start(real_node=True)`` (or ``cluster.py up
--real-node``). Everything stays on this machine:

* **Network.** A Linux bridge ``kubetune0`` with ``10.202.0.1/24`` is the node: the node's
  InternalIP, the API server's advertised address (the ``kubernetes`` Service's endpoint), CoreDNS
  and anything a test serves to pods (S3) listen there. The bridge CNI plugin puts pods on the same
  bridge (host-local IPAM, ``10.202.0.0/24``), so the subnet exists only inside this machine.
* **Runtime.** Debian's containerd 1.6 + runc, our own instance (socket under ``/run/kubetune``,
  content store in ``$KUBETUNE_CACHE/containerd`` so imported images survive restarts). The CRI
  config sets ``restrict_oom_score_adj`` (this VM lacks CAP_SYS_RESOURCE, so kubelet's -998 for the
  sandbox would fail) and a ``sandbox_image`` built locally (``hack/images.sh``: pause.c compiled
  statically), because nothing can be pulled.
* **kubelet** (built from ``k8s.io/kubernetes/cmd/kubelet`` at the control plane's version):
  cgroupfs driver (cgroup v1 here), swap allowed, client cert ``system:node:<name>``, webhook
  authn/authz so ``kubectl logs/exec`` work through the API server, image GC off (the trainer image
  is large and cannot be pulled again). The node's ``nvidia.com/gpu`` capacity is patched in as an
  extended resource, as the Kubernetes docs describe for resources without a device plugin.
* **kube-proxy** (iptables mode) so pods reach the API server through ``kubernetes.default``;
  **CoreDNS** (built from its Go module) runs as a host process on the node IP and answers
  ``*.svc.cluster.local``; kubelet hands it to pods as their nameserver.

Needs root and the Debian packages ``containerd runc containernetworking-plugins iptables``
(``.ci/run`` installs them). :func:`missing_prerequisites` says what is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from cluster import LocalCluster

NODE_NAME = "kubetune-node"
BRIDGE = "kubetune0"
NODE_IP = "10.202.0.1"
POD_CIDR = "10.202.0.0/24"
NODE_GPUS = 8
NODE_LABELS = {"kubetune.dev/runner": "true", "kubetune.dev/node": "real", "nvidia.com/gpu.present": "true",
               "nvidia.com/gpu.memory": "16384"}  # GPU feature discovery's label (MiB): the "will it fit?" check
COREDNS_VERSION = os.environ.get("KUBETUNE_COREDNS_VERSION", "v1.12.4")
COREDNS_PKG = "github.com/coredns/coredns"
NODE_BINARIES = ("kubelet", "kube-proxy", "coredns")
CNI_DIRS = ("/usr/lib/cni", "/opt/cni/bin")
APT_PACKAGES = "containerd runc containernetworking-plugins iptables"


def runtime_dir() -> Path:
    return Path(os.environ.get("KUBETUNE_RUNTIME_DIR", "/run/kubetune"))


def containerd_socket() -> Path:
    return runtime_dir() / "containerd" / "containerd.sock"


def cni_bin_dir() -> str | None:
    return next((d for d in CNI_DIRS if os.access(Path(d) / "bridge", os.X_OK)), None)


def missing_prerequisites() -> list[str]:
    """What this machine lacks to run the real node (empty: ready)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (the node creates a bridge, iptables rules and containers)")
    for exe in ("containerd", "runc", "iptables", "ip"):
        if not shutil.which(exe):
            missing.append(f"{exe} (apt-get install {APT_PACKAGES})")
    if cni_bin_dir() is None:
        missing.append("the CNI plugins (apt-get install containernetworking-plugins)")
    return missing


# --------------------------------------------------------------------------- build
def is_built(out: Path) -> bool:
    stamp = out / ".coredns-version"
    return all(os.access(out / n, os.X_OK) for n in NODE_BINARIES) and (
        stamp.exists() and stamp.read_text() == COREDNS_VERSION)


def build(cluster_mod, out: Path, wrapper: Path, version: str) -> None:
    """kubelet + kube-proxy from the wrapper module, CoreDNS from its own module (cached)."""
    jobs = os.environ.get("KUBETUNE_BUILD_JOBS", str(min(os.cpu_count() or 2, 4)))
    if not all(os.access(out / n, os.X_OK) for n in ("kubelet", "kube-proxy")):
        env = cluster_mod._go_env("readonly")
        tmp = out / ".tmp-node"
        tmp.mkdir(parents=True, exist_ok=True)
        pkgs = ["k8s.io/kubernetes/cmd/kubelet", "k8s.io/kubernetes/cmd/kube-proxy"]
        args = ["build", "-v", "-p", jobs, "-trimpath", "-ldflags", cluster_mod._version_ldflags(version)]
        cluster_mod._run_go([*args, "-o", str(tmp) + "/", *pkgs], env, wrapper, f"build kubelet + kube-proxy {version}")
        for name in ("kubelet", "kube-proxy"):
            os.replace(tmp / name, out / name)
        shutil.rmtree(tmp, ignore_errors=True)
    stamp = out / ".coredns-version"
    if not (os.access(out / "coredns", os.X_OK) and stamp.exists() and stamp.read_text() == COREDNS_VERSION):
        env = cluster_mod._go_env("readonly")
        env.update(GOBIN=str(out), GOFLAGS="-buildvcs=false")
        cluster_mod._run_go(
            ["install", "-v", "-p", jobs, "-trimpath", "-ldflags", "-s -w", f"{COREDNS_PKG}@{COREDNS_VERSION}"],
            env,
            Path("/tmp"),
            f"install coredns {COREDNS_VERSION}",
        )
        stamp.write_text(COREDNS_VERSION)


# --------------------------------------------------------------------------- start / stop
def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    return r


def setup_network() -> None:
    """The node's bridge and address (idempotent); forwarding on for pod traffic."""
    if _run("ip", "link", "show", BRIDGE, check=False).returncode != 0:
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
    if NODE_IP not in _run("ip", "-4", "addr", "show", "dev", BRIDGE).stdout:
        _run("ip", "addr", "add", f"{NODE_IP}/24", "dev", BRIDGE)
    _run("ip", "link", "set", BRIDGE, "up")
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1")
    nf = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
    if nf.exists():
        nf.write_text("1")  # pod -> Service -> pod on the same bridge goes through kube-proxy's rules


def containerd_config(pause_image: str) -> str:
    d = runtime_dir() / "containerd"
    root = Path(os.environ.get("KUBETUNE_CACHE") or Path.home() / ".cache" / "kubetune").expanduser() / "containerd"
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2
root = "{root}"
state = "{d / 'state'}"
[grpc]
  address = "{containerd_socket()}"
[{cri}]
  sandbox_image = "{pause_image}"
  restrict_oom_score_adj = true
  enable_unprivileged_ports = true
[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri}.cni]
  bin_dir = "{cni_bin_dir()}"
  conf_dir = "{d / 'net.d'}"
"""


def cni_config(run_dir: Path) -> dict:
    return {
        "cniVersion": "0.4.0",
        "name": "kubetune",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": True,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_CIDR, "rangeStart": "10.202.0.10", "gateway": NODE_IP}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(run_dir / "cni-ipam"),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def kubelet_config(c: LocalCluster, ports: dict[str, int]) -> dict:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": NODE_IP,
        "port": ports["kubelet"],
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": ports["kubelet-healthz"],
        "containerRuntimeEndpoint": f"unix://{containerd_socket()}",
        "cgroupDriver": "cgroupfs",
        "failSwapOn": False,
        "failCgroupV1": False,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(c.ca_file)},
        },
        "authorization": {"mode": "Webhook"},
        "clusterDNS": [NODE_IP],
        "clusterDomain": "cluster.local",
        "resolvConf": str(c.run_dir / "node" / "resolv.conf"),
        # The images cannot be pulled again: never garbage-collect them. Disk pressure would make
        # the kubelet delete every image no running pod uses (seen: a build elsewhere on the
        # machine filled the disk and the trainer image was gone), so it is declared only when the
        # disk is really full, in absolute terms, not as a share of a large shared disk.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "512Mi", "imagefs.available": "512Mi",
                         "nodefs.inodesFree": "1%", "imagefs.inodesFree": "1%"},
        "serializeImagePulls": False,
        "maxPods": 110,
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
        "tlsCertFile": str(c.run_dir / "pki" / "kubelet-serving.crt"),
        "tlsPrivateKeyFile": str(c.run_dir / "pki" / "kubelet-serving.key"),
        "shutdownGracePeriod": "0s",
        "nodeStatusUpdateFrequency": "5s",
        "syncFrequency": "10s",
        "fileCheckFrequency": "20s",
    }


def kube_proxy_config(c: LocalCluster, ports: dict[str, int]) -> dict:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(c.run_dir / "kube-proxy.kubeconfig")},
        "mode": "iptables",
        "clusterCIDR": POD_CIDR,
        "hostnameOverride": NODE_NAME,
        "bindAddress": NODE_IP,
        "healthzBindAddress": f"127.0.0.1:{ports['kube-proxy-healthz']}",
        "metricsBindAddress": f"127.0.0.1:{ports['kube-proxy-metrics']}",
        # leave the machine's conntrack sysctls alone (0 = do not set)
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
    }


def corefile(c: LocalCluster, port: int) -> str:
    return f""".:53 {{
    bind {NODE_IP}
    errors
    health 127.0.0.1:{port}
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {c.run_dir / 'coredns.kubeconfig'} coredns@kubetune
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
}}
"""


def _yaml(obj: dict) -> str:
    return json.dumps(obj, indent=2)  # JSON is YAML; the components read either


def start(c: LocalCluster, deadline: float, pause_image: str) -> None:
    """Start containerd, kubelet, kube-proxy and CoreDNS for ``c`` (its API server must advertise
    NODE_IP); returns when the node is Ready with its GPUs advertised and DNS answers."""
    import cluster as cm

    problems = missing_prerequisites()
    if problems:
        raise cm.ComponentError("kubelet", "the real node needs: " + "; ".join(problems))
    nd = c.run_dir / "node"
    nd.mkdir(parents=True, exist_ok=True)
    ports = {k: cm.free_port() for k in ("kubelet", "kubelet-healthz", "kube-proxy-healthz",
                                        "kube-proxy-metrics", "coredns-health")}
    c.ports.update(ports)
    setup_network()

    # containerd: ours, not the system's (dockerd may run its own for image builds)
    cd = runtime_dir() / "containerd"
    (cd / "net.d").mkdir(parents=True, exist_ok=True)
    for old in (cd / "net.d").glob("*"):
        old.unlink()
    (cd / "net.d" / "10-kubetune.conflist").write_text(json.dumps(cni_config(c.run_dir), indent=2))
    (nd / "containerd.toml").write_text(containerd_config(pause_image))
    c._spawn_exe("containerd", shutil.which("containerd") or "containerd", ["--config", str(nd / "containerd.toml")])
    c._wait("containerd", lambda: _ctr("version", check=False).returncode == 0, deadline, "ctr version")
    # the images hack/images.sh built (pause, operator, trainer) go into this containerd; a no-op
    # when they are there already (the content store outlives the node)
    t0 = time.monotonic()
    load = subprocess.run(["bash", str(Path(__file__).with_name("images.sh")), "load", "--address",
                           str(containerd_socket())], capture_output=True, text=True)
    c.timings["containerd: load images"] = round(time.monotonic() - t0, 2)
    deadline += time.monotonic() - t0  # a cold import of the trainer image (GBs) takes minutes
    if load.returncode != 0:
        raise cm.ComponentError("containerd", "loading the images failed (run: bash hack/images.sh build)",
                                (load.stdout + load.stderr)[-3000:])
    if pause_image not in _ctr("-n", "k8s.io", "images", "ls", "-q", check=False).stdout.split():
        raise cm.ComponentError("containerd", f"sandbox image {pause_image} is not in containerd after the load")

    # kubelet
    (nd / "resolv.conf").write_text("nameserver 127.0.0.1\n")  # upstream for pods: none (offline)
    (nd / "kubelet.yaml").write_text(_yaml(kubelet_config(c, ports)))
    labels = ",".join(f"{k}={v}" for k, v in NODE_LABELS.items())
    c._spawn_exe("kubelet", str(cm.bin_dir(c.version) / "kubelet"), [
        f"--config={nd / 'kubelet.yaml'}",
        f"--kubeconfig={c.run_dir / 'kubelet.kubeconfig'}",
        f"--root-dir={nd / 'kubelet'}",
        f"--cert-dir={nd / 'kubelet-pki'}",
        f"--hostname-override={NODE_NAME}",
        f"--node-ip={NODE_IP}",
        f"--node-labels={labels}",
        "--v=1",
    ])
    c._wait("kubelet", lambda: _node_ready(c), deadline, f"node {NODE_NAME} Ready")
    advertise_gpus(c)

    # kube-proxy, CoreDNS
    (nd / "kube-proxy.yaml").write_text(_yaml(kube_proxy_config(c, ports)))
    c._spawn_exe("kube-proxy", str(cm.bin_dir(c.version) / "kube-proxy"), [f"--config={nd / 'kube-proxy.yaml'}"])
    (nd / "Corefile").write_text(corefile(c, ports["coredns-health"]))
    c._spawn_exe("coredns", str(cm.bin_dir(c.version) / "coredns"), ["-conf", str(nd / "Corefile")])
    c._wait("kube-proxy", lambda: cm._http(f"http://127.0.0.1:{ports['kube-proxy-healthz']}/healthz",
                                           timeout=2)[0] == 200, deadline, "GET /healthz")
    c._wait("coredns", lambda: cm._http(f"http://127.0.0.1:{ports['coredns-health']}/health",
                                        timeout=2)[0] == 200, deadline, "GET /health")


def _ctr(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run("ctr", "--address", str(containerd_socket()), *args, check=check)


def _node_ready(c: LocalCluster) -> bool:
    node = c.request("GET", f"/api/v1/nodes/{NODE_NAME}", ok404=True)
    return bool(node) and any(
        x.get("type") == "Ready" and x.get("status") == "True" for x in node.get("status", {}).get("conditions", [])
    )


def advertise_gpus(c: LocalCluster, gpus: int = NODE_GPUS) -> None:
    """An extended resource without a device plugin: patch it into the node's capacity (the kubelet
    then copies it to allocatable)."""
    c.request("PATCH", f"/api/v1/nodes/{NODE_NAME}/status",
              {"status": {"capacity": {"nvidia.com/gpu": str(gpus)}}},
              content_type="application/merge-patch+json")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        node = c.request("GET", f"/api/v1/nodes/{NODE_NAME}")
        if node["status"].get("allocatable", {}).get("nvidia.com/gpu") == str(gpus):
            return
        time.sleep(0.5)
    raise RuntimeError(f"node {NODE_NAME} did not report nvidia.com/gpu={gpus} as allocatable")


def cleanup(run_dir: Path) -> None:
    """After kubelet stopped: remove every pod sandbox and container of ours (containerd's shims
    outlive it), then unmount the kubelet's volumes so the run dir can be removed."""
    sock = containerd_socket()
    if sock.exists():
        tasks = _ctr("-n", "k8s.io", "tasks", "ls", "-q", check=False).stdout.split()
        for t in tasks:
            _ctr("-n", "k8s.io", "tasks", "kill", "-s", "SIGKILL", t, check=False)
        for t in tasks:
            for _ in range(20):
                if _ctr("-n", "k8s.io", "tasks", "delete", t, check=False).returncode == 0:
                    break
                time.sleep(0.25)
        for cid in _ctr("-n", "k8s.io", "containers", "ls", "-q", check=False).stdout.split():
            _ctr("-n", "k8s.io", "containers", "delete", cid, check=False)
    unmount_under(run_dir)


def stop_leftover_shims() -> None:
    """containerd-shim processes of our containerd (matched by its socket in their command line)."""
    needle = str(containerd_socket()).encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"containerd-shim" in cmd and needle in cmd:
            try:
                os.kill(int(pid), 9)
            except OSError:
                pass


def unmount_under(path: Path) -> None:
    prefix = str(path.resolve()) + "/"
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    for m in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", m], capture_output=True)
