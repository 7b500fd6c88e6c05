# syntax=docker/dockerfile:1
# acroscreen server, GPU image (CUDA). Build from the repository root:
#
#   docker build -f deploy/docker/gpu.Dockerfile -t acroscreen:gpu .
#   docker run --rm --gpus 1 -p 127.0.0.1:50051:50051 -p 127.0.0.1:9464:9464 \
#     -e ACROSCREEN_INSECURE=true acroscreen:gpu
#
# Needs the NVIDIA Container Toolkit on the host and a driver for CUDA 12.8 (R570 or newer).
# The model runs on the GPU (ACROSCREEN_DEVICE=cuda); decoding, detection and landmarks on the
# CPU, so give the container several cores. Configuration as for the CPU image: ACROSCREEN_*
# environment variables; a mounted weights file replaces the demo weights via ACROSCREEN_MODEL.
#
# Base: the CUDA `base` flavour of the runtime images (libcudart, the compat package and the
# NVIDIA_* settings the container toolkit reads). torch's CUDA wheels bring their own cuBLAS and
# cuDNN, so the larger `runtime` / `cudnn-runtime` flavours would only add a second, unused copy
# of those libraries (several GB).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

# ---------------------------------------------------------------- build: a venv with the server
FROM ${CUDA_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG REQUIRE_DEMO_WEIGHTS=1
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/acroscreen
ENV PATH=/opt/acroscreen/bin:$PATH
# The install steps live in install.sh, which CI runs into a fresh venv (no Docker engine there).
COPY deploy/docker/install.sh /tmp/install.sh
RUN sh /tmp/install.sh torch "${TORCH_VERSION}" "${TORCH_INDEX_URL}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY client/ client/
COPY server/ server/
COPY deploy/docker/check_weights.py deploy/docker/check_weights.py
# The server extra only (no development, media (PyAV) or test tools), then the weights/torch check.
RUN sh /tmp/install.sh package /src cuda "${REQUIRE_DEMO_WEIGHTS}"

# ---------------------------------------------------------------- runtime: the venv, non-root
FROM ${CUDA_IMAGE} AS runtime
LABEL org.opencontainers.image.title="acroscreen" \
      org.opencontainers.image.description="Acromegaly facial screening gRPC service (CUDA). Research software, not a medical device." \
      org.opencontainers.image.licenses="Apache-2.0"
ENV DEBIAN_FRONTEND=noninteractive
# Only the interpreter the venv points at; no compilers, no pip cache, no apt lists.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 acroscreen \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin acroscreen
COPY --from=build /opt/acroscreen /opt/acroscreen
COPY --chmod=0755 deploy/docker/healthcheck.py /opt/acroscreen/bin/acroscreen-healthcheck
ENV PATH=/opt/acroscreen/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    ACROSCREEN_HOST=0.0.0.0 \
    ACROSCREEN_PORT=50051 \
    ACROSCREEN_METRICS_PORT=9464 \
    ACROSCREEN_DEVICE=cuda
USER 10001:10001
WORKDIR /tmp
# 50051: gRPC (screening, grpc.health.v1, reflection); 9464: Prometheus /metrics
EXPOSE 50051 9464
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 CMD ["acroscreen-healthcheck"]
# SIGTERM drains: health NOT_SERVING, new streams refused, running ones finish (ACROSCREEN_GRACE_PERIOD_S).
STOPSIGNAL SIGTERM
ENTRYPOINT ["acroscreen", "serve"]
