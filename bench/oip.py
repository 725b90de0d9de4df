"""W1 through the Open Inference Protocol: `python -m bench.oip [--calls N] [--repeats R] [--device cpu]`.

The W1 call (CosineSimilarity of two 64x128 float32 tensors, one call at a time on one channel)
against one `cosserve serve`, made by cosserve's own client (Client.compute, the Compute RPC) and
by the real tritonclient (ModelInfer), in the same run, taking turns repeat by repeat. tritonclient
lives in its own venv (tests/toolenv.py: its pins would downgrade ours), so it runs as a
subprocess that times its own loop with the same clock; the inputs are made from the same seed.
Both clients take numpy arrays and return numpy arrays on every call (tritonclient's InferInput
is made and filled per call, as Client.compute converts its inputs per call).
Prints p50/p90/p99 in microseconds and the ratio tritonclient / cosserve client.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence

import numpy as np

from bench.servers import start_cosserve
from cosserve import Client
from tests import toolenv

__all__ = ["main"]

TRITONCLIENT = ["tritonclient[grpc]==2.73.0"]
OP, SHAPE = "CosineSimilarity", (64, 128)

# Runs in tritonclient's venv. Each line on stdin, "calls warmup", is answered by one line: the
# latencies of that many ModelInfer calls, in microseconds, as JSON.
_TRITON_LOOP = r"""
import json, sys, time
import numpy as np
import tritonclient.grpc as tc
address, op, rows, cols = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
client = tc.InferenceServerClient(address)
rng = np.random.default_rng(0)
arrays = {name: rng.standard_normal((rows, cols), dtype=np.float32) for name in ("X", "Y")}

def call():
    # numpy in, numpy out, as Client.compute: the inputs are wrapped and serialized every call.
    inputs = []
    for name, array in arrays.items():
        item = tc.InferInput(name, list(array.shape), "FP32")
        item.set_data_from_numpy(array)
        inputs.append(item)
    return client.infer(op, inputs).as_numpy("S")

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


def _ours(client: Client, inputs: dict[str, np.ndarray], device: str, calls: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        client.compute(OP, inputs, ["S"], device=device)
    out = []
    clock = time.perf_counter
    for _ in range(calls):
        start = clock()
        client.compute(OP, inputs, ["S"], device=device)
        out.append((clock() - start) * 1e6)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.oip", description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="timed calls per repeat and client [default 1000]")
    parser.add_argument("--warmup", type=int, default=100, help="untimed calls before each repeat [default 100]")
    parser.add_argument("--repeats", type=int, default=5, help="turns of each client [default 5]")
    parser.add_argument("--device", default="cpu", help="the server's device [default cpu]")
    ns = parser.parse_args(argv)
    python = toolenv.python("tritonclient", TRITONCLIENT)
    rng = np.random.default_rng(0)
    inputs = {name: rng.standard_normal(SHAPE, dtype=np.float32) for name in ("X", "Y")}
    runs: dict[str, list[list[float]]] = {"cosserve client (Compute)": [], "tritonclient (ModelInfer)": []}
    started = time.perf_counter()
    with start_cosserve(device=ns.device) as server, Client(server.address) as client:
        triton = subprocess.Popen(
            [str(python), "-c", _TRITON_LOOP, server.address, OP, str(SHAPE[0]), str(SHAPE[1])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert triton.stdin is not None and triton.stdout is not None
        try:
            for repeat in range(ns.repeats):
                # Who goes first alternates, so drift favours neither.
                for kind in list(runs) if repeat % 2 == 0 else list(reversed(runs)):
                    if kind.startswith("tritonclient"):
                        triton.stdin.write(f"{ns.calls} {ns.warmup}\n")
                        triton.stdin.flush()
                        line = triton.stdout.readline()
                        if not line:
                            raise RuntimeError("the tritonclient loop exited early")
                        runs[kind].append(json.loads(line))
                    else:
                        runs[kind].append(_ours(client, inputs, ns.device, ns.calls, ns.warmup))
        finally:
            triton.stdin.close()
            try:
                triton.wait(30)
            except subprocess.TimeoutExpired:
                triton.kill()
    print(f"W1 ({OP} of two {SHAPE[0]}x{SHAPE[1]} float32, sequential, one channel; {ns.repeats} x {ns.calls} calls each)")
    print("| client | p50 µs | p90 µs | p99 µs |\n|---|---:|---:|---:|")
    medians: dict[str, dict[int, float]] = {}
    for kind, samples in runs.items():
        # The median over repeats of each repeat's percentile.
        medians[kind] = {q: float(np.median([np.percentile(s, q) for s in samples])) for q in (50, 90, 99)}
        print(f"| {kind} | {medians[kind][50]:,.0f} | {medians[kind][90]:,.0f} | {medians[kind][99]:,.0f} |")
    ours, theirs = medians["cosserve client (Compute)"], medians["tritonclient (ModelInfer)"]
    print(
        "tritonclient / cosserve client: "
        + ", ".join(f"p{q} {theirs[q] / ours[q]:.2f}x" for q in (50, 90, 99))
        + f" ({time.perf_counter() - started:.0f} s; device {ns.device})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
