"""What traces cost W1: `python -m bench.tracing [--calls N] [--warmup W] [--repeats R] [--device cpu]`.

Three `cosserve serve` processes, alike but for their OTEL_* variables, answer the W1 call
(CosineSimilarity of two 64x128 float32 tensors, one call at a time on one channel) in the same
run, taking turns repeat by repeat: traces off, on with every call sampled (`always_on`), and on
with 1 % sampled (`traceidratio` 0.01). The two traced ones export with the SDK's default batch
schedule to an OTLP/gRPC receiver in a process of its own (`python -m bench.tracing --receiver`:
opentelemetry-proto's TraceService, which counts the spans and drops them), so that neither the
receiver nor the exporter's work lands in the client's process. Prints p50/p90/p99 latency and
server CPU per call (psutil), the spans received, and each traced server's ratio to the
untraced one. Needs the otel extra (and psutil, the bench extra).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Sequence
from concurrent import futures
from typing import Any

import numpy as np

from bench.servers import ServerProcess, start_cosserve
from cosserve import Client
from cosserve.client import trace_metadata

__all__ = ["main"]

OP, SHAPE = "CosineSimilarity", (64, 128)
# name -> the server's OTEL_* variables besides the endpoint (None: traces off, no endpoint).
CONFIGURATIONS: dict[str, dict[str, str] | None] = {
    "off": None,
    "on, 100 % sampled": {"OTEL_TRACES_SAMPLER": "always_on"},
    "on, 1 % sampled": {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"},
}


def _receiver() -> int:
    """The OTLP/gRPC receiver: prints `PORT <n>`, then `SPANS <total>` after every export."""
    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    class Counter(trace_service_pb2_grpc.TraceServiceServicer):
        def __init__(self) -> None:
            self.spans = 0
            self.lock = threading.Lock()

        def Export(self, request: Any, context: Any) -> Any:
            count = sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
            with self.lock:
                self.spans += count
                print(f"SPANS {self.spans}", flush=True)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Counter(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"PORT {port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while not stop.wait(0.5):  # until the bench's SIGTERM
        pass
    server.stop(0)
    return 0


def _spans(receiver: ServerProcess) -> int:
    counts = [int(m.group(1)) for line in list(receiver.lines) if (m := re.fullmatch(r"SPANS (\d+)", line))]
    return counts[-1] if counts else 0


def _run(
    client: Client, server: ServerProcess, inputs: dict[str, np.ndarray], device: str, calls: int, warmup: int
) -> tuple[list[float], float]:
    """(latency of each call in µs, the server's CPU µs per call)."""
    for _ in range(warmup):
        client.compute(OP, inputs, ["S"], device=device)
    out = []
    clock = time.perf_counter
    before = server.process.cpu_times()
    for _ in range(calls):
        start = clock()
        client.compute(OP, inputs, ["S"], device=device)
        out.append((clock() - start) * 1e6)
    after = server.process.cpu_times()
    return out, (after.user + after.system - before.user - before.system) / calls * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tracing", description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per repeat and server [default 2000]")
    parser.add_argument("--warmup", type=int, default=200, help="untimed calls before each repeat [default 200]")
    parser.add_argument("--repeats", type=int, default=5, help="turns of each server [default 5]")
    parser.add_argument("--device", default="cpu", help="the servers' device [default cpu]")
    parser.add_argument("--receiver", action="store_true", help=argparse.SUPPRESS)  # the receiver's own process
    ns = parser.parse_args(argv)
    if ns.receiver:
        return _receiver()
    rng = np.random.default_rng(0)
    inputs = {name: rng.standard_normal(SHAPE, dtype=np.float32) for name in ("X", "Y")}
    latencies: dict[str, list[list[float]]] = {name: [] for name in CONFIGURATIONS}
    cpu: dict[str, list[float]] = {name: [] for name in CONFIGURATIONS}
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        argv = [sys.executable, "-m", "bench.tracing", "--receiver"]
        receiver = stack.enter_context(ServerProcess(argv, r"^PORT (\d+)", "otlp-receiver"))
        endpoint = f"http://{receiver.address}"
        servers: dict[str, ServerProcess] = {}
        clients: dict[str, Client] = {}
        for name, otel in CONFIGURATIONS.items():
            # None of this shell's OTEL_* reach a server: each has exactly its own.
            env = {key: "" for key in os.environ if key.startswith("OTEL_")}
            if otel is not None:
                env.update(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=endpoint, OTEL_SERVICE_NAME=f"cosserve-bench-{name}", **otel)
            servers[name] = stack.enter_context(start_cosserve(device=ns.device, env=env))
            clients[name] = stack.enter_context(Client(servers[name].address))
            if otel is not None and not any("traces: on" in line for line in servers[name].lines):
                raise RuntimeError(f"the server {name!r} did not turn traces on: {servers[name].lines[-5:]}")
        assert trace_metadata() == (), "the client must send no trace context: the servers' samplers decide"
        names = list(CONFIGURATIONS)
        for repeat in range(ns.repeats):
            for name in names[repeat % len(names) :] + names[: repeat % len(names)]:  # who goes first rotates
                samples, per_call = _run(clients[name], servers[name], inputs, ns.device, ns.calls, ns.warmup)
                latencies[name].append(samples)
                cpu[name].append(per_call)
        for server in servers.values():  # SIGTERM: each traced server sends the spans it still holds
            server.stop()
        deadline = time.monotonic() + 10
        every_call = ns.repeats * (ns.calls + ns.warmup)  # at 100 %: a server span per call (W1's op runs inline)
        while _spans(receiver) < every_call and time.monotonic() < deadline:
            time.sleep(0.2)
        spans = _spans(receiver)
    calls = ns.repeats * (ns.calls + ns.warmup)
    print(f"W1 ({OP} of two {SHAPE[0]}x{SHAPE[1]} float32, sequential, one channel; {ns.repeats} x {ns.calls} calls each; device {ns.device})")
    print("| traces | p50 µs | p90 µs | p99 µs | server CPU µs/call |\n|---|---:|---:|---:|---:|")
    medians: dict[str, dict[str, float]] = {}
    for name, runs in latencies.items():
        # The median over repeats of each repeat's percentile (and of its CPU per call).
        medians[name] = {f"p{q}": float(np.median([np.percentile(r, q) for r in runs])) for q in (50, 90, 99)}
        medians[name]["cpu"] = float(np.median(cpu[name]))
        m = medians[name]
        print(f"| {name} | {m['p50']:,.0f} | {m['p90']:,.0f} | {m['p99']:,.0f} | {m['cpu']:,.0f} |")
    off = medians["off"]
    for name in names[1:]:
        m = medians[name]
        print(f"{name} / off: " + ", ".join(f"{k} {m[k] / off[k]:.3f}x" for k in ("p50", "p90", "p99", "cpu")))
    print(f"spans received: {spans:,} for {calls:,} calls per server ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
