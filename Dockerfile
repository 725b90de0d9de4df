# cosserve server image. CPU by default; the CUDA image is the same file with torch from a CUDA index:
#
#   docker build -t cosserve:0.1.0 .
#   docker build -t cosserve:0.1.0-cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 .
#
# torch's CUDA wheels carry their CUDA libraries, so both images start from the same Python base;
# the CUDA image needs only the NVIDIA driver on the host (the NVIDIA Container Toolkit mounts it)
# and picks the GPU by itself (--device auto). podman and buildah write OCI images, which have no
# HEALTHCHECK: build with `--format docker` to keep it (docs/deploy.md). Kubernetes ignores it and
# uses its own gRPC probes (deploy/k8s/).
#
# tests/deploy/test_dockerfile.py runs this file's install steps in a fresh virtual environment and
# starts the ENTRYPOINT, since no container engine runs where the tests do: keep each step a
# plain shell command.

ARG PYTHON_IMAGE=python:3.11-slim

# ---- wheel: the cosserve wheel, built from the sources (the sources stay in this stage) ----
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY client ./client
COPY server ./server
RUN python -m pip wheel --no-deps --wheel-dir /wheels .

# ---- torch: a virtual environment with torch alone, its own layer (large, rarely changed) ----
FROM ${PYTHON_IMAGE} AS torch
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
ENV VIRTUAL_ENV=/opt/cosserve
ENV PATH=/opt/cosserve/bin:$PATH
RUN python -m venv /opt/cosserve
RUN python -m pip install --index-url "$TORCH_INDEX" "torch==$TORCH_VERSION"

# ---- runtime: the final image (the default target) ----
FROM torch AS runtime
COPY --from=wheel /wheels /opt/cosserve-wheels
# The rest of the server's dependencies from PyPI; torch is already met, so pip keeps it. The otel
# extra too: traces are off until an OTEL_EXPORTER_OTLP_ENDPOINT is set (README, "Tracing").
RUN python -m pip install "$(echo /opt/cosserve-wheels/cosserve-*.whl)[server,otel]"
# The user, and the state directory it owns: a volume mounted there (--state-dir) starts out writable.
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin cosserve && install -d -o 10001 -g 10001 -m 0750 /var/lib/cosserve
USER 10001:10001
# Listen on all interfaces inside the container; every flag also reads COSSERVE_<FLAG>.
ENV COSSERVE_HOST=0.0.0.0 COSSERVE_PORT=50051 COSSERVE_METRICS_PORT=9464
# gRPC (grpc.health.v1 included, open without a token), and Prometheus metrics at /metrics.
EXPOSE 50051 9464
# Follows COSSERVE_PORT. With OCI images (podman, buildah) pass the same command as --health-cmd,
# or build with --format docker. A server with --tls-cert needs `--tls` here too.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 CMD cosserve health --server "127.0.0.1:${COSSERVE_PORT}"
# exec form: SIGTERM reaches the server, which drains in-flight calls for --grace-s and exits 0.
ENTRYPOINT ["cosserve", "serve"]
