#!/usr/bin/env bash
# `make e2e-kind`: the tests/e2e suite on a kind cluster with real kubelets and the real images.
#
#   bash hack/e2e-kind.sh            # needs docker, kind, kubectl, helm and the repo's .venv
#   KEEP=1 bash hack/e2e-kind.sh     # keep the cluster afterwards (kind delete cluster --name kubetune-e2e)
#
# Steps: kind cluster -> build the Dockerfile targets `operator` and `trainer` and load them ->
# fake GPU capacity + the runner label on the kind node -> helm install the chart (CRDs + operator)
# -> an S3 server (moto) on the host, reachable from the pods through the kind network gateway ->
# pytest -m e2e with KUBETUNE_E2E_KUBECONFIG (the suite then uses this cluster instead of
# starting the local control plane and the pod runner).
set -euo pipefail
cd "$(dirname "$0")/.."
CLUSTER=${KIND_CLUSTER:-kubetune-e2e}
TAG=${IMAGE_TAG:-e2e}
PY=${PYTHON:-.venv/bin/python}
S3_PORT=${S3_PORT:-9000}
KUBECONFIG_FILE=$(mktemp -t kind-kubeconfig.XXXXXX)
S3_PID=""

cleanup() {
  [[ -n "$S3_PID" ]] && kill "$S3_PID" 2>/dev/null || true
  if [[ -z "${KEEP:-}" ]]; then kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true; fi
  rm -f "$KUBECONFIG_FILE"
}
trap cleanup EXIT

for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || { echo "e2e-kind: $tool is required" >&2; exit 1; }
done

kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER" --wait 180s
kind get kubeconfig --name "$CLUSTER" > "$KUBECONFIG_FILE"
export KUBECONFIG=$KUBECONFIG_FILE

docker build --target operator -t "kubetune/operator:$TAG" .
docker build --target trainer -t "kubetune/trainer:$TAG" .
kind load docker-image --name "$CLUSTER" "kubetune/operator:$TAG" "kubetune/trainer:$TAG"

# kind nodes have no GPUs: label them as the runner and advertise nvidia.com/gpu so `gpus: 1` schedules.
for node in $(kubectl get nodes -o name); do
  kubectl label "$node" kubetune.dev/runner=true --overwrite
  kubectl patch "$node" --subresource=status --type=json \
    -p '[{"op": "add", "path": "/status/capacity/nvidia.com~1gpu", "value": "8"}]'
done

helm upgrade --install kubetune charts/kubetune -n kubetune-system --create-namespace --wait --timeout 5m \
  --set image.repository=kubetune/operator --set image.tag="$TAG" --set image.pullPolicy=Never \
  --set trainerImage="kubetune/trainer:$TAG" --set leaderElection.enabled=false --set clusterWide=true

# S3 on the host, on all interfaces: the tests use 127.0.0.1, the pods the kind network's gateway.
"$PY" -m moto.server -H 0.0.0.0 -p "$S3_PORT" >/tmp/kubetune-e2e-s3.log 2>&1 &
S3_PID=$!
GATEWAY=$(docker network inspect kind -f '{{range .IPAM.Config}}{{if .Gateway}}{{.Gateway}} {{end}}{{end}}' \
  | tr ' ' '\n' | grep -E '^[0-9.]+$' | head -1)
for _ in $(seq 50); do curl -fs "http://127.0.0.1:$S3_PORT/moto-api/" >/dev/null && break; sleep 0.2; done

export KUBETUNE_E2E_KUBECONFIG=$KUBECONFIG_FILE
export KUBETUNE_E2E_S3_ENDPOINT=http://127.0.0.1:$S3_PORT
export KUBETUNE_E2E_S3_POD_ENDPOINT=http://$GATEWAY:$S3_PORT
"$PY" -m pytest tests/e2e -m e2e -p no:cacheprovider "$@"
