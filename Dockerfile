# cosserve server image (CPU). For CUDA, build FROM an image with CUDA torch and drop the
# --index-url line; sessions then default to the GPU (`--device auto`).
FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, in its own layer: it is the big, rarely changing part.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.2"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY client ./client
COPY server ./server
RUN pip install ".[server]" && useradd --uid 10001 --no-create-home cosserve

USER 10001
EXPOSE 50051
# Listen on all interfaces inside the container; every flag also reads COSSERVE_<FLAG>.
ENV COSSERVE_HOST=0.0.0.0 COSSERVE_PORT=50051
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s CMD ["cosserve", "health", "--server", "127.0.0.1:50051"]
# exec form: SIGTERM reaches the server, which drains in-flight calls and exits 0.
ENTRYPOINT ["cosserve", "serve"]
