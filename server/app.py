"""Building and running the gRPC server: `build_server` for tests and embedding, `serve` for main."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading
import warnings
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cosserve import limits
from cosserve.server import servicer
from cosserve.server import settings as settings_mod
from cosserve.server.errors import CosserveError
from cosserve.server.metrics import Metrics
from cosserve.server.servicer import SERVICE_NAME, CosserveServicer
from cosserve.server.settings import Settings
from cosserve.server.status import ErrorInterceptor
from cosserve.server.workspace import SessionStore, resolve_device

__all__ = ["RunningServer", "build_server", "run", "serve"]

log = logging.getLogger("cosserve.server")



@dataclasses.dataclass
class RunningServer:
    """A started server: its grpc.Server, the bound port, its health servicer and its sessions."""

    server: grpc.Server
    port: int
    address: str
    health: health.HealthServicer
    store: SessionStore
    metrics: Metrics | None = None
    metrics_port: int = 0

    def stop(self, grace: float | None = None) -> None:
        """Mark NOT_SERVING, let in-flight calls finish within `grace` seconds, then stop."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        if self.metrics is not None:
            self.metrics.stop()


def build_server(settings: Settings) -> RunningServer:
    """Create, bind and start a server (port 0 binds a free port; see `.port`)."""
    # Inputs are decoded as read-only views of the request bytes; ops never write in place.
    warnings.filterwarnings("ignore", message="The given buffer is not writable")
    resolve_device(settings.device)  # a bad --device fails here, not in every client's call
    store = SessionStore(settings)
    metrics = Metrics(store) if settings.metrics_port else None
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.max_workers, thread_name_prefix="cosserve"),
        interceptors=[ErrorInterceptor(settings.auth_token, metrics.observe if metrics else None)],
        options=list(limits.GRPC_OPTIONS),
    )
    servicer.add_to_server(CosserveServicer(store, settings), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    host = settings.host
    bind = f"[{host}]:{settings.port}" if ":" in host else f"{host}:{settings.port}"
    port = server.add_insecure_port(bind)
    if port == 0:
        raise OSError(f"could not bind {bind}")
    server.start()
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    metrics_port = metrics.start(host, settings.metrics_port) if metrics else 0
    return RunningServer(server, port, address, health_servicer, store, metrics, metrics_port)


def serve(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT, then drain in-flight calls and return 0."""
    running = build_server(settings)
    log.info("cosserve listening on %s (default device %s)", running.address, settings.device)
    if running.metrics_port:
        log.info("metrics at http://%s:%d/metrics", settings.host, running.metrics_port)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        log.info("received %s; draining for up to %.0f s", signal.Signals(signum).name, settings.grace_s)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stop.wait(timeout=60.0):
            expired = running.store.expire_idle()
            if expired:
                log.info("closed %d idle session(s)", expired)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    running.stop(settings.grace_s)
    log.info("cosserve stopped")
    return 0


def run(ns: argparse.Namespace) -> int:
    """`cosserve serve` with parsed flags: 2 with a one-line message for a bad setting."""
    try:
        settings = settings_mod.from_args(ns)
        resolve_device(settings.device)
    except (ValueError, CosserveError) as err:
        print(f"cosserve serve: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return serve(settings)
