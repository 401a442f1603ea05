#!/usr/bin/env bash
# Debian packages the tests and the real node use, installed with apt when missing (CI machines are
# fresh; a developer machine keeps what it has). Needs root for apt; prints what it installs.
#   lua5.4                                  Argo CD health checks (charts/kubetune/health)
#   containerd runc containernetworking-plugins iptables   the real node (hack/realnode.py)
#   docker.io debootstrap                   images from the Dockerfile, offline (hack/images.sh)
set -euo pipefail
want=(lua5.4:lua5.4 containerd:containerd runc:runc containernetworking-plugins:/usr/lib/cni/bridge
      iptables:iptables docker.io:dockerd debootstrap:debootstrap)
missing=()
for pair in "${want[@]}"; do
  pkg=${pair%%:*} probe=${pair#*:}
  if [[ "$probe" == /* ]]; then [[ -x "$probe" ]] || missing+=("$pkg")
  else command -v "$probe" >/dev/null || [[ -x "/usr/sbin/$probe" ]] || missing+=("$pkg"); fi
done
((${#missing[@]})) || exit 0
if [[ $(id -u) != 0 ]]; then
  echo "system-deps: missing Debian packages: ${missing[*]} (run as root: apt-get install ${missing[*]})" >&2
  exit 0  # the tests that need them say so; the rest run
fi
echo "system-deps: apt-get install ${missing[*]}" >&2
apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
