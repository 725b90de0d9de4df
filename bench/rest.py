"""W1 over the Open Inference Protocol's REST binding beside its gRPC one: `python -m bench.rest
[--calls N] [--repeats R] [--device cpu]`.

The W1 call (CosineSimilarity of two 64x128 float32 tensors, one call at a time on one
connection) against one `cosserve serve`, made by the real tritonclient three ways in the same
run, taking turns repeat by repeat: over gRPC (ModelInfer), over REST with the binary tensor data
extension (tritonclient.http's default) and over REST with JSON lists (`binary_data=False` for
inputs and outputs). Each tritonclient lives in its own venv (tests/toolenv.py) and runs as a
subprocess that times its own loop; the inputs are made from the same seed. Prints p50/p90/p99
in microseconds, the server's CPU per call (psutil), and the ratios REST / gRPC: the cost of
the REST door, client library included (wall) and on the server alone (CPU).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence

import numpy as np

from bench.oip import _TRITON_LOOP, OP, SHAPE, TRITONCLIENT
from bench.servers import start_cosserve
from tests import toolenv

__all__ = ["main"]

TRITONCLIENT_HTTP = ["tritonclient[http]==2.73.0"]

# Runs in tritonclient[http]'s venv, as bench.oip's loop does in tritonclient[grpc]'s.
_REST_LOOP = r"""
import json, sys, time
import numpy as np
import tritonclient.http as tc
address, op, rows, cols, binary = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
client = tc.InferenceServerClient(address)
rng = np.random.default_rng(0)
arrays = {name: rng.standard_normal((rows, cols), dtype=np.float32) for name in ("X", "Y")}

def call():
    inputs = []
    for name, array in arrays.items():
        item = tc.InferInput(name, list(array.shape), "FP32")
        item.set_data_from_numpy(array, binary_data=binary)
        inputs.append(item)
    outputs = [tc.InferRequestedOutput("S", binary_data=binary)]
    return client.infer(op, inputs, outputs=outputs).as_numpy("S")

clock = time.perf_counter
for line in sys.stdin:
    calls, warmup = map(int, line.split())
    for _ in range(warmup):
        call()
    out = []
    for _ in range(calls):
        start = clock()
        call()
        out.append((clock() - start) * 1e6)
    print(json.dumps(out), flush=True)
"""

GRPC, BINARY, JSON_LISTS = "gRPC (ModelInfer)", "REST, binary tensor data", "REST, JSON lists"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rest", description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="timed calls per repeat and client [default 1000]")
    parser.add_argument("--warmup", type=int, default=100, help="untimed calls before each repeat [default 100]")
    parser.add_argument("--repeats", type=int, default=5, help="turns of each client [default 5]")
    parser.add_argument("--device", default="cpu", help="the server's device [default cpu]")
    ns = parser.parse_args(argv)
    grpc_python = toolenv.python("tritonclient", TRITONCLIENT)
    http_python = toolenv.python("tritonclient", TRITONCLIENT_HTTP)
    runs: dict[str, list[list[float]]] = {GRPC: [], BINARY: [], JSON_LISTS: []}
    cpu: dict[str, list[float]] = {kind: [] for kind in runs}
    started = time.perf_counter()
    size = [str(SHAPE[0]), str(SHAPE[1])]
    with start_cosserve(device=ns.device, rest=True) as server:
        loops = {
            GRPC: [str(grpc_python), "-c", _TRITON_LOOP, server.address, OP, *size],
            BINARY: [str(http_python), "-c", _REST_LOOP, server.rest_address, OP, *size, "1"],
            JSON_LISTS: [str(http_python), "-c", _REST_LOOP, server.rest_address, OP, *size, "0"],
        }
        children = {kind: subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for kind, argv in loops.items()}
        try:
            for repeat in range(ns.repeats):
                order = list(runs) if repeat % 2 == 0 else list(reversed(runs))  # drift favours none
                for kind in order:
                    child = children[kind]
                    assert child.stdin is not None and child.stdout is not None
                    child.stdin.write(f"{ns.calls} {ns.warmup}\n")
                    child.stdin.flush()
                    before = server.process.cpu_times()
                    line = child.stdout.readline()
                    after = server.process.cpu_times()
                    if not line:
                        raise RuntimeError(f"the {kind} loop exited early")
                    runs[kind].append(json.loads(line))
                    # The warm-up calls run on the server too: the CPU is per call of both.
                    spent = after.user + after.system - before.user - before.system
                    cpu[kind].append(spent / (ns.calls + ns.warmup) * 1e6)
        finally:
            for child in children.values():
                assert child.stdin is not None
                child.stdin.close()
                try:
                    child.wait(30)
                except subprocess.TimeoutExpired:
                    child.kill()
    print(f"W1 ({OP} of two {SHAPE[0]}x{SHAPE[1]} float32, sequential, one connection; {ns.repeats} x {ns.calls} calls each)")
    print("| tritonclient over | p50 µs | p90 µs | p99 µs | server CPU µs/call |\n|---|---:|---:|---:|---:|")
    medians: dict[str, dict[int | str, float]] = {}
    for kind, samples in runs.items():
        medians[kind] = {q: float(np.median([np.percentile(s, q) for s in samples])) for q in (50, 90, 99)}
        medians[kind]["cpu"] = float(np.median(cpu[kind]))
        m = medians[kind]
        print(f"| {kind} | {m[50]:,.0f} | {m[90]:,.0f} | {m[99]:,.0f} | {m['cpu']:,.0f} |")
    for kind in (BINARY, JSON_LISTS):
        print(
            f"{kind} / gRPC: "
            + ", ".join(f"p{q} {medians[kind][q] / medians[GRPC][q]:.2f}x" for q in (50, 90, 99))
            + f", server CPU {medians[kind]['cpu'] / medians[GRPC]['cpu']:.2f}x"
        )
    print(f"({time.perf_counter() - started:.0f} s; device {ns.device})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
