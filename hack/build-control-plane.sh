#!/usr/bin/env bash
# Build (once) and cache kube-apiserver, kube-controller-manager, kube-scheduler,
# etcd and kwok in ${KUBETUNE_CACHE:-$HOME/.cache/kubetune}/k8s-<version>/bin.
# A no-op (< 1 s) when already cached.  Only needs the Go module proxy.
#   hack/build-control-plane.sh            # build if needed
#   hack/build-control-plane.sh --regen    # regenerate hack/k8s/go.mod from k8s.io/kubernetes' go.mod
#   hack/build-control-plane.sh --force    # rebuild
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x "$here/../.venv/bin/python" ]]; then py="$here/../.venv/bin/python"; else py="$(command -v python3)"; fi
fi
exec "$py" "$here/cluster.py" build "$@"
