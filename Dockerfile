# kubetune images, built from one Dockerfile:
#   docker build --target operator -t ghcr.io/kubetune/operator:0.1.0 .   # slim Python, kopf
#   docker build --target trainer  -t ghcr.io/kubetune/trainer:0.1.0 .    # CUDA runtime, torch + trainer
# Both install with hack/install.sh (the script CI uses), pinned by constraints.txt, run as the
# non-root user 1000 (the uid the operator's pod securityContext asks for) and hold no secrets:
# credentials reach the pods only as secretKeyRef environment variables.
# Two install layers per image: the dependencies (torch and the CUDA libraries: GBs) depend only on
# the dependency lists of pyproject.toml, constraints.txt and hack/install.sh; the kubetune sources
# come after them and install --no-deps, so a source change rebuilds in seconds.
# Without registry access: bash hack/images.sh builds both targets on stand-in base images.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# -------------------------------------------------------------------------------- requirements
# The extras' requirement lists, extracted from pyproject.toml: an edit elsewhere in pyproject.toml
# (pytest, ruff settings) leaves them, and so the dependency layers below, unchanged.
FROM ${PYTHON_IMAGE} AS requirements
WORKDIR /src
COPY pyproject.toml ./
COPY hack/install.sh hack/install.sh
RUN bash hack/install.sh operator reqs > operator.txt \
    && bash hack/install.sh trainer reqs > trainer.txt

# ------------------------------------------------------------------------------------ operator
FROM ${PYTHON_IMAGE} AS operator
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/kubetune
COPY constraints.txt ./
COPY hack/install.sh hack/install.sh
COPY --from=requirements /src/operator.txt requirements.txt
RUN bash hack/install.sh operator deps requirements.txt \
    && useradd --uid 1000 --user-group --no-create-home --home-dir /tmp kubetune
COPY pyproject.toml README.md ./
COPY kubetune kubetune
COPY operator operator
COPY trainer trainer
RUN bash hack/install.sh operator self
USER 1000:1000
EXPOSE 8080
ENTRYPOINT ["kubetune"]
CMD ["operator", "--all-namespaces"]

# ------------------------------------------------------------------------------------ trainer
FROM ${CUDA_IMAGE} AS trainer
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/var/kubetune/cache \
    HOME=/tmp
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
WORKDIR /opt/kubetune
COPY constraints.txt ./
COPY hack/install.sh hack/install.sh
COPY --from=requirements /src/trainer.txt requirements.txt
RUN bash hack/install.sh trainer deps requirements.txt \
    && (id -u 1000 >/dev/null 2>&1 && userdel --remove "$(id -nu 1000)" || true) \
    && useradd --uid 1000 --user-group --no-create-home --home-dir /tmp kubetune \
    && mkdir -p /var/kubetune/work /var/kubetune/cache \
    && chown -R 1000:1000 /var/kubetune
COPY pyproject.toml README.md ./
COPY kubetune kubetune
COPY operator operator
COPY trainer trainer
RUN bash hack/install.sh trainer self
USER 1000:1000
ENTRYPOINT ["kubetune"]
CMD ["train", "--spec", "/etc/kubetune/spec.json"]
