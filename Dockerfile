# kubetune images, built from one Dockerfile:
#   docker build --target operator -t ghcr.io/kubetune/operator:0.1.0 .   # slim Python, kopf
#   docker build --target trainer  -t ghcr.io/kubetune/trainer:0.1.0 .    # CUDA runtime, torch + trainer
# Both install with hack/install.sh (the script CI uses), pinned by constraints.txt, run as the
# non-root user 1000 (the uid the operator's pod securityContext asks for) and hold no secrets:
# credentials reach the pods only as secretKeyRef environment variables.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# ------------------------------------------------------------------------------------ operator
FROM ${PYTHON_IMAGE} AS operator
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/kubetune
COPY pyproject.toml README.md constraints.txt ./
COPY hack/install.sh hack/install.sh
COPY kubetune kubetune
COPY operator operator
COPY trainer trainer
RUN bash hack/install.sh operator \
    && useradd --uid 1000 --user-group --no-create-home --home-dir /tmp kubetune
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
COPY pyproject.toml README.md constraints.txt ./
COPY hack/install.sh hack/install.sh
COPY kubetune kubetune
COPY operator operator
COPY trainer trainer
RUN bash hack/install.sh trainer \
    && (id -u 1000 >/dev/null 2>&1 && userdel --remove "$(id -nu 1000)" || true) \
    && useradd --uid 1000 --user-group --no-create-home --home-dir /tmp kubetune \
    && mkdir -p /var/kubetune/work /var/kubetune/cache \
    && chown -R 1000:1000 /var/kubetune
USER 1000:1000
ENTRYPOINT ["kubetune"]
CMD ["train", "--spec", "/etc/kubetune/spec.json"]
