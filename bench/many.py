"""W5, many clients with one query each: C client threads, each sending one query at a time
(`Session.top_k`, top-10) against a shared corpus `@w5` that `cosserve serve --corpus` maps,
against in-process torch scoring C queries per call of the same core (the limit: one pass for C
queries). Queries/s of each, and the service's p50/p99 latency per call.

    python -m bench.many                                         # 200,000 and 1,000,000 x 384; C = 1, 8, 64
    python -m bench.many --corpus-rows 200000 --clients 8 --seconds 5
    python -m bench.many --device cuda                           # sessions and the torch path on CUDA

The server is the real `cosserve serve` in its own process (bench.servers), with the default
opportunistic batching (--score-pass-queries 1024, no queue delay) and its metrics on a free
port, from which the table's "queries per pass" comes (the mean over the timed calls and the
warm-up; none from a server without them); the clients are threads of this process, one
channel and one session each. Paths alternate per C, so drift hits both.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench.report import machine
from bench.servers import start_cosserve
from cosserve import Client

__all__ = ["main"]


def _service(address: str, queries: np.ndarray, clients: int, seconds: float, k: int, device: str) -> dict[str, Any]:
    """C threads, each calling top_k with one query at a time for `seconds`: queries/s, p50, p99."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []
    ready = threading.Barrier(clients + 1)
    stop = threading.Event()

    def client(slot: int) -> None:
        try:
            with Client(address, timeout=300) as c, c.session(device) as session:
                session.top_k(queries[slot : slot + 1], "@w5", k=k)  # warm-up: channel, session, norms
                ready.wait(timeout=600)
                clock, i, mine = time.perf_counter, slot, latencies[slot]
                while not stop.is_set() and len(mine) < 1_000_000:
                    started = clock()
                    session.top_k(queries[i % len(queries) : i % len(queries) + 1], "@w5", k=k)
                    mine.append(clock() - started)
                    i += clients
        except BaseException as err:  # noqa: BLE001  (reported after join)
            errors.append(err)
            ready.abort()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    ready.wait(timeout=600)
    started = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(600)
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    every = np.array([x for mine in latencies for x in mine]) * 1e3
    return {"qps": len(every) / elapsed, "p50_ms": float(np.percentile(every, 50)), "p99_ms": float(np.percentile(every, 99)),
            "calls": len(every)}


def _passes(port: int) -> tuple[float, float] | None:
    """(passes, queries) scored so far, from the server's metrics; None where it has none."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    except OSError:
        return None
    count = re.search(r"^cosserve_score_pass_queries_count (\S+)$", text, re.M)
    total = re.search(r"^cosserve_score_pass_queries_sum (\S+)$", text, re.M)
    return None if count is None or total is None else (float(count.group(1)), float(total.group(1)))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _in_process(corpus: Any, norms: Any, queries: Any, clients: int, seconds: float, k: int) -> dict[str, Any]:
    """The same core scoring C queries per call, back to back: the most one pass of C can give."""
    import torch

    from cosserve.server.compute import similarity

    sync = torch.cuda.synchronize if corpus.device.type == "cuda" else (lambda: None)
    similarity.top_k(queries[:clients], corpus, k, norms)  # warm-up
    sync()
    calls, started = 0, time.perf_counter()
    times = []
    while calls < 2 or time.perf_counter() - started < seconds:
        at = (calls * clients) % max(1, len(queries) - clients)
        t0 = time.perf_counter()
        similarity.top_k(queries[at : at + clients], corpus, k, norms)[1].cpu()
        times.append(time.perf_counter() - t0)
        calls += 1
    elapsed = time.perf_counter() - started
    return {"qps": calls * clients / elapsed, "p50_ms": float(np.median(times)) * 1e3, "calls": calls}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.many", description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus-rows", type=int, nargs="+", default=[200_000, 1_000_000], help="M [default 200000 1000000]")
    parser.add_argument("--dim", type=int, default=384, help="D [default 384]")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64], help="C [default 1 8 64]")
    parser.add_argument("--k", type=int, default=10, help="[default 10]")
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds of each path at each C [default 10]")
    parser.add_argument("--device", default="cpu", help="device of the sessions and of the torch path [default cpu]")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args(argv)
    import torch

    from cosserve.server.compute import similarity

    rng = np.random.default_rng(ns.seed)
    rows = []
    for m in ns.corpus_rows:
        corpus = rng.standard_normal((m, ns.dim), dtype=np.float32)
        queries = rng.standard_normal((max(4096, max(ns.clients)), ns.dim), dtype=np.float32)
        with tempfile.TemporaryDirectory(prefix="cosserve-w5-") as tmp:
            path = os.path.join(tmp, "w5.npy")
            np.save(path, corpus)
            device = torch.device(ns.device)
            local = torch.from_numpy(corpus).to(device)
            local_queries = torch.from_numpy(queries).to(device)
            norms = similarity.inverse_norms(local)
            port = _free_port()
            env = {"COSSERVE_CORPUS": f"w5={path}", "COSSERVE_METRICS_PORT": str(port)}
            with start_cosserve(device=ns.device, env=env) as server:
                for clients in ns.clients:
                    print(f"W5 {m:,}x{ns.dim}, C={clients} ...", file=sys.stderr, flush=True)
                    before = _passes(port)
                    service = _service(server.address, queries, clients, ns.seconds, ns.k, ns.device)
                    after = _passes(port)
                    if before is not None and after is not None and after[0] > before[0]:
                        service["queries_per_pass"] = (after[1] - before[1]) / (after[0] - before[0])
                    limit = _in_process(local, norms, local_queries, clients, ns.seconds, ns.k)
                    rows.append({"corpus_rows": m, "clients": clients, "service": service, "torch": limit,
                                 "ratio": service["qps"] / limit["qps"]})
            del local, local_queries, norms
    info = machine()
    print(f"\nW5: top-{ns.k}, one query per call, shared corpus @w5 x {ns.dim} float32, device {ns.device}; "
          f"{ns.seconds:g} s per path\n")
    print("| corpus | C | service queries/s | torch, C per call, queries/s | service / torch | service p50 ms | service p99 ms "
          "| queries per pass |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        s, t = r["service"], r["torch"]
        print(f"| {r['corpus_rows']:,} | {r['clients']} | {s['qps']:.1f} | {t['qps']:.1f} | {r['ratio']:.2f} | "
              f"{s['p50_ms']:.1f} | {s['p99_ms']:.1f} | {s.get('queries_per_pass', float('nan')):.1f} |")
    print(f"\n({info['nproc']} x {info['cpu']}; load average {info['loadavg']})")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump({"bench": "w5", "k": ns.k, "dim": ns.dim, "device": ns.device, "seconds": ns.seconds,
                       "machine": info, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
