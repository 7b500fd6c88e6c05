# syntax=docker/dockerfile:1
# acroscreen server, CPU image. Build from the repository root:
#
#   docker build -f deploy/docker/cpu.Dockerfile -t acroscreen:cpu .
#   docker run --rm -p 127.0.0.1:50051:50051 -p 127.0.0.1:9464:9464 \
#     -e ACROSCREEN_INSECURE=true acroscreen:cpu
#
# Configuration is by ACROSCREEN_* environment variables (`acroscreen serve --help` lists them).
# Plaintext gRPC on 0.0.0.0 is refused unless ACROSCREEN_INSECURE=true; for TLS mount a
# certificate and key and set ACROSCREEN_TLS_CERT / ACROSCREEN_TLS_KEY instead.
# Another model: mount the file and point ACROSCREEN_MODEL at it, e.g.
#   -v /srv/models/clinical.safetensors:/models/model.safetensors:ro \
#   -e ACROSCREEN_MODEL=/models/model.safetensors
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- build: a venv with the server
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
# The CPU-only wheel: the default Linux wheel carries several GB of CUDA libraries unused here.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# 1 (default): fail the build when the demo weights are missing from server/weights/.
# 0: build anyway; the container then needs ACROSCREEN_MODEL (a mounted weights file).
ARG REQUIRE_DEMO_WEIGHTS=1
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/acroscreen
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
RUN sh /tmp/install.sh package /src cpu "${REQUIRE_DEMO_WEIGHTS}"

# ---------------------------------------------------------------- runtime: the venv, non-root
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="acroscreen" \
      org.opencontainers.image.description="Acromegaly facial screening gRPC service (CPU). Research software, not a medical device." \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 acroscreen \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin acroscreen
COPY --from=build /opt/acroscreen /opt/acroscreen
COPY --chmod=0755 deploy/docker/healthcheck.py /opt/acroscreen/bin/acroscreen-healthcheck
ENV PATH=/opt/acroscreen/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    ACROSCREEN_HOST=0.0.0.0 \
    ACROSCREEN_PORT=50051 \
    ACROSCREEN_METRICS_PORT=9464 \
    ACROSCREEN_DEVICE=cpu
USER 10001:10001
WORKDIR /tmp
# 50051: gRPC (screening, grpc.health.v1, reflection); 9464: Prometheus /metrics
EXPOSE 50051 9464
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 CMD ["acroscreen-healthcheck"]
# SIGTERM drains: health NOT_SERVING, new streams refused, running ones finish (ACROSCREEN_GRACE_PERIOD_S).
STOPSIGNAL SIGTERM
ENTRYPOINT ["acroscreen", "serve"]
