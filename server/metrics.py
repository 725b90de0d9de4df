"""Prometheus metrics of one server: calls by method and status, latency, sessions and bytes."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cosserve.server.sessions import SessionStore

__all__ = ["Metrics"]


class Metrics:
    """Collectors in a registry of their own; `start` serves them over HTTP at /metrics."""

    def __init__(self, store: SessionStore) -> None:
        import prometheus_client as prom  # optional: only a server with --metrics-port needs it

        self._prom = prom
        self.registry = prom.CollectorRegistry()
        self.calls = prom.Counter(
            "cosserve_rpcs", "Finished RPCs by method and status code", ["method", "code"], registry=self.registry
        )
        self.seconds = prom.Histogram(
            "cosserve_rpc_seconds",
            "RPC handling time by method",
            ["method"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        sessions = prom.Gauge("cosserve_sessions", "Open sessions", registry=self.registry)
        sessions.set_function(lambda: len(store))
        held = prom.Gauge("cosserve_session_bytes", "Bytes of blobs held by all sessions", registry=self.registry)
        held.set_function(lambda: sum(ws.held_bytes() for ws in store))

    def observe(self, method: str, code: str, seconds: float) -> None:
        name = method.rsplit("/", 1)[-1]
        self.calls.labels(name, code).inc()
        self.seconds.labels(name).observe(seconds)

    def start(self, host: str, port: int) -> int:
        """Serve /metrics on host:port; return the bound port."""
        server, _thread = self._prom.start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return int(server.server_port)

    def stop(self) -> None:
        server = getattr(self, "_server", None)
        if server is not None:
            server.shutdown()
            server.server_close()
