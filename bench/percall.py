"""Server CPU per call: `python -m bench.percall [--calls N]` runs a few call kinds against a
real `cosserve serve` and the bare aio floor, and prints wall time and server CPU per call
(psutil process times), to show where W1/W2 time goes."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import numpy as np

from bench.floor import FloorClient
from bench.servers import ServerProcess, start_cosserve, start_floor
from cosserve import Client

__all__ = ["main"]


def _measure(server: ServerProcess, call: Callable[[], object], calls: int) -> tuple[float, float]:
    """(wall µs, server CPU µs) per call, after 10% warm-up calls."""
    for _ in range(max(1, calls // 10)):
        call()
    before = server.process.cpu_times()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    wall = time.perf_counter() - start
    after = server.process.cpu_times()
    cpu = after.user + after.system - before.user - before.system
    return wall / calls * 1e6, cpu / calls * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.percall", description=__doc__)
    parser.add_argument("--calls", type=int, default=1500, help="calls per kind [default 1500]")
    ns = parser.parse_args(argv)
    x = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32)
    tiny = np.ones((1, 2), np.float32)
    rows = []
    with start_cosserve() as server, Client(server.address) as client, client.session("cpu") as ws:
        ws.feed_blob("a", tiny)
        kinds: dict[str, Callable[[], object]] = {
            "HasBlob": lambda: ws.has_blob("a"),
            "Compute CosineSimilarity 1x2": lambda: client.compute("CosineSimilarity", {"X": tiny, "Y": tiny}, ["S"]),
            "Compute CosineSimilarity 64x128 (W1)": lambda: client.compute("CosineSimilarity", {"X": x, "Y": x}, ["S"]),
            "FeedBlob 32 KiB": lambda: ws.feed_blob("b", x),
            "fetch_blob 8 B": lambda: ws.fetch_blob("a"),
        }
        for name, call in kinds.items():
            rows.append(("cosserve", name, *_measure(server, call, ns.calls)))
    with start_floor("aio") as floor, FloorClient(floor.address) as bare:
        bare.configure(answer_bytes=300)
        for name, size in (("unary 10 B", 10), ("unary 128 KiB (as W1)", 131072)):
            request = bytes(size)
            rows.append(("aio floor", name, *_measure(floor, lambda: bare.unary(request), ns.calls)))
    print("| server | call | wall µs | server CPU µs |\n|---|---|---:|---:|")
    for server_name, name, wall, cpu in rows:
        print(f"| {server_name} | {name} | {wall:,.0f} | {cpu:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
