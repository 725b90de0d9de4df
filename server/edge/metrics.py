"""Prometheus metrics of one server: calls, refusals, op time, tensor bytes, resident bytes, process."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cosserve.server.state.sessions import SessionStore

__all__ = ["Metrics"]

# Codes that mean the caller's request or a limit stopped the call (not our bugs, not success).
_REFUSALS = frozenset({
    "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED", "PERMISSION_DENIED",
    "FAILED_PRECONDITION", "DEADLINE_EXCEEDED", "OUT_OF_RANGE", "ALREADY_EXISTS",
})


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
        self.refused = prom.Counter(
            "cosserve_refused_calls",
            "Calls refused or failed because of the request or a limit, by status code",
            ["reason"],
            registry=self.registry,
        )
        self.op_seconds = prom.Histogram(
            "cosserve_op_seconds",
            "Time of one operator run, by op and device",
            ["op", "device"],
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.tensor_bytes = prom.Counter(
            "cosserve_tensor_bytes",
            "Tensor bytes received (in) and sent (out), by method",
            ["direction", "method"],
            registry=self.registry,
        )
        self.pass_queries = prom.Histogram(
            "cosserve_score_pass_queries",
            "Queries scored by one ScoreTopK pass over a corpus, every waiting stream's together",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384),
            registry=self.registry,
        )
        self.pass_wait = prom.Histogram(
            "cosserve_score_pass_wait_seconds",
            "Time a ScoreTopK batch (or the rest of one) waited in the queue for its pass",
            buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        registry = self.registry
        prom.ProcessCollector(registry=registry)
        prom.PlatformCollector(registry=registry)
        prom.GCCollector(registry=registry)
        registry.register(_ResidentBytes(store, prom))
        sessions = prom.Gauge("cosserve_sessions", "Open sessions", registry=self.registry)
        sessions.set_function(lambda: len(store))
        held = prom.Gauge("cosserve_session_bytes", "Bytes of blobs held by all sessions", registry=self.registry)
        held.set_function(lambda: sum(ws.held_bytes() for ws in store))

    def observe(self, method: str, code: str, seconds: float) -> None:
        name = method.rsplit("/", 1)[-1]
        self.calls.labels(name, code).inc()
        self.seconds.labels(name).observe(seconds)
        if code in _REFUSALS:
            self.refused.labels(code).inc()

    def observe_op(self, op: str, device: str, seconds: float) -> None:
        self.op_seconds.labels(op, device).observe(seconds)

    def observe_pass(self, queries: int, waits: Sequence[float]) -> None:
        """One ScoreTopK pass (called on the scoring thread; the collectors are thread-safe)."""
        self.pass_queries.observe(queries)
        for seconds in waits:
            self.pass_wait.observe(seconds)

    def count_bytes(self, direction: str, method: str, nbytes: int) -> None:
        self.tensor_bytes.labels(direction, method).inc(nbytes)

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


class _ResidentBytes:
    """cosserve_resident_bytes{device}: bytes of blobs held, summed per device at scrape time."""

    def __init__(self, store: SessionStore, prom: Any) -> None:
        self._store = store
        self._family = prom.metrics_core.GaugeMetricFamily

    def collect(self) -> Iterator[Any]:
        totals: dict[str, int] = {}
        for workspace in self._store:
            device = str(workspace.device)
            totals[device] = totals.get(device, 0) + workspace.held_bytes()
        family = self._family("cosserve_resident_bytes", "Bytes of blobs held, by device", labels=["device"])
        for device, nbytes in sorted(totals.items()):
            family.add_metric([device], nbytes)
        yield family
