"""The whole product on the real node: images built from the Dockerfile, the local control plane with
a kubelet + containerd node, S3 on the node's address, and the operator installed by ``helm install``
of ``charts/kubetune`` -- what a platform team gets from ``helm install`` on a real cluster.

Used by ``tests/e2e`` (the ``real`` systems) and ``hack/demo.py --real-node``::

    env = RealNodeEnv.start(log_dir)        # images (cached), cluster, chart, S3
    env.cluster.kubeconfig, env.s3.endpoint, env.images["TRAINER_IMAGE"]
    env.stop()
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HACK = Path(__file__).resolve().parent
REPO = HACK.parent
if str(HACK) not in sys.path:
    sys.path.insert(0, str(HACK))

import cluster  # noqa: E402
import localenv  # noqa: E402
import realnode  # noqa: E402

RELEASE = "kubetune"
OPERATOR_NAMESPACE = "kubetune-system"


def log(msg: str) -> None:
    print(f"[real-node] {msg}", file=sys.stderr, flush=True)


def helm_binary() -> str:
    helm = cluster.cache_dir() / "helm" / "helm"
    if not os.access(helm, os.X_OK):
        subprocess.run(["bash", str(HACK / "build-helm.sh")], check=True)
    return str(helm)


def build_images() -> dict[str, str]:
    """``hack/images.sh build`` (a no-op in seconds when nothing changed); returns images.env."""
    t0 = time.monotonic()
    r = subprocess.run(["bash", str(HACK / "images.sh"), "build"], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"hack/images.sh build failed ({r.returncode}):\n{(r.stdout + r.stderr)[-4000:]}")
    log(f"images ready in {time.monotonic() - t0:.0f}s")
    return read_images()


def read_images() -> dict[str, str]:
    env = cluster.cache_dir() / "images" / "images.env"
    pairs = (line.split("=", 1) for line in env.read_text().splitlines() if "=" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def split_ref(ref: str) -> tuple[str, str]:
    repo, _, tag = ref.rpartition(":")
    return (repo, tag) if repo and "/" not in tag else (ref, "latest")


def helm_install(c: cluster.LocalCluster, images: dict[str, str], timeout: str = "240s") -> None:
    """``helm upgrade --install`` of the chart with the images built here (never pulled)."""
    repo, tag = split_ref(images["OPERATOR_IMAGE"])
    cmd = [
        helm_binary(), "upgrade", "--install", RELEASE, str(REPO / "charts" / "kubetune"),
        f"--kubeconfig={c.kubeconfig}", "-n", OPERATOR_NAMESPACE, "--create-namespace",
        "--set", f"image.repository={repo}", "--set", f"image.tag={tag}", "--set", "image.pullPolicy=Never",
        "--set", f"trainerImage={images['TRAINER_IMAGE']}", "--set", "logFormat=plain",
        "--set", "clusterWide=true",  # the tests' namespaces come and go
        "--set", "nodeSelector.kubetune\\.dev/node=real",  # not on kwok's fake nodes
        "--wait", f"--timeout={timeout}",
    ]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        pods = c.kubectl("get", "pods", "-n", OPERATOR_NAMESPACE, "-o", "wide", check=False).stdout
        logs = c.kubectl("logs", "-n", OPERATOR_NAMESPACE, f"deploy/{RELEASE}", "--tail=40", check=False)
        raise RuntimeError(f"helm install failed:\n{r.stdout}{r.stderr}\n{pods}\n{logs.stdout}{logs.stderr}")
    log(f"helm install: {time.monotonic() - t0:.0f}s")


@dataclass
class RealNodeEnv:
    cluster: cluster.LocalCluster
    s3: Any
    images: dict[str, str]
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def start(cls, log_dir: Path) -> RealNodeEnv:
        problems = realnode.missing_prerequisites()
        if problems:
            raise RuntimeError("the real node needs: " + "; ".join(problems))
        timings: dict[str, float] = {}
        t0 = time.monotonic()
        images = build_images()
        timings["images"] = time.monotonic() - t0
        t1 = time.monotonic()
        c = cluster.LocalCluster.start(real_node=True)
        timings["cluster"] = time.monotonic() - t1
        s3 = None
        try:
            s3 = localenv.S3Server(host=realnode.NODE_IP, log_dir=log_dir).start()
            t2 = time.monotonic()
            helm_install(c, images)
            timings["chart"] = time.monotonic() - t2
        except BaseException:
            if s3 is not None:
                s3.stop()
            c.stop()
            raise
        log("ready: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
        return cls(c, s3, images, timings)

    def operator_logs(self, tail: int = 60) -> str:
        r = self.cluster.kubectl("logs", "-n", OPERATOR_NAMESPACE, f"deploy/{RELEASE}", f"--tail={tail}", check=False)
        return r.stdout + r.stderr

    def stop(self) -> None:
        try:
            self.s3.stop()
        finally:
            self.cluster.stop()
