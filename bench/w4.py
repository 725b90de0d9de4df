"""W4 by batch size: exact top-k over one corpus, the service (ScoreTopK, batches of B queries)
against the same core in-process and faiss IndexFlatIP (BLAS path on, as bench/score.py sets it),
for B = 1, 16 and 256 by default; bench/score.py's three paths, one server, one corpus.

    python -m bench.w4                                   # 1,000,000 x 384, B = 1 16 256
    python -m bench.w4 --corpus-rows 200000 --batches 1 256 --seconds 5
    python -m bench.w4 --device cuda --skip-faiss        # the service and torch on CUDA

Each path runs for --seconds per repeat (at least one batch), the paths interleaved, --repeat
times; the table gives the best queries/s of each (the least disturbed by other work) and the
ratios. faiss needs `pip install faiss-cpu` (not a dependency of cosserve).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench import score
from bench.report import machine

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.w4", description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus-rows", type=int, default=1_000_000, help="M [default 1000000]")
    parser.add_argument("--dim", type=int, default=384, help="D [default 384]")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256], help="B, queries per batch [default 1 16 256]")
    parser.add_argument("--k", type=int, default=10, help="[default 10]")
    parser.add_argument("--seconds", type=float, default=10.0, help="time of one run of a path [default 10]")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each path, interleaved [default 2]")
    parser.add_argument("--device", default="cpu", help="device of the session and of the torch path [default cpu]")
    parser.add_argument("--skip-faiss", action="store_true", help="leave out faiss")
    parser.add_argument("--faiss-blas-threshold", type=int, default=20, help="as bench/score.py [default 20]")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    ns = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((ns.corpus_rows, ns.dim), dtype=np.float32)
    queries = rng.standard_normal((max(4096, 4 * max(ns.batches)), ns.dim), dtype=np.float32)
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    server = context.Process(target=score._serve, args=(child, ns.device, corpus.nbytes + 2**30), daemon=True)
    server.start()
    if not parent.poll(120):
        server.kill()
        print("the server did not start within 120 s", file=sys.stderr)
        return 1
    base = argparse.Namespace(device=ns.device, k=ns.k, batch_size=ns.batches[0], max_seconds=ns.seconds,
                              faiss_blas_threshold=ns.faiss_blas_threshold)  # fmt: skip
    service = score.ServicePath(parent.recv(), corpus, base)
    rows: list[dict[str, Any]] = []
    try:
        paths: list[Any] = [service, score.TorchPath(corpus, base)]
        if not ns.skip_faiss:
            paths.append(score.FaissPath(corpus, base))
        keys = ["service", "torch", "faiss"][: len(paths)]
        for batch in ns.batches:
            base.batch_size = batch
            for path in paths:
                path.run(queries[:batch])  # warm-up
            best = dict.fromkeys(keys, 0.0)
            same = True
            for repeat in range(ns.repeat):
                results = {}
                for key, path in zip(keys, paths):
                    results[key] = path.run(queries)
                    best[key] = max(best[key], results[key]["qps"])
                    print(f"  B={batch} run {repeat + 1}/{ns.repeat} {key}: {results[key]['qps']:.1f} queries/s",
                          file=sys.stderr, flush=True)  # fmt: skip
                n = min(results["service"]["queries"], results["torch"]["queries"])
                same = same and bool(np.array_equal(results["service"]["indices"][:n], results["torch"]["indices"][:n]))
            rows.append({"batch": batch, "qps": best, "service_torch_identical": same})
    finally:
        service.close()
        parent.send("stop")
        server.join(30)
        if server.is_alive():
            server.kill()
    info = machine()
    print(f"\nW4: top-{ns.k} of {ns.corpus_rows:,} x {ns.dim} float32, device {ns.device}, best of {ns.repeat} runs of "
          f"{ns.seconds:g} s\n")
    head = "| queries per batch | " + " | ".join(f"{k} queries/s" for k in keys) + " | service / torch |"
    head += " service / faiss |" if "faiss" in keys else ""
    print(head + "\n|" + "---:|" * (head.count("|") - 1))
    for r in rows:
        q = r["qps"]
        line = f"| {r['batch']} | " + " | ".join(f"{q[k]:.1f}" for k in keys) + f" | {q['service'] / q['torch']:.2f} |"
        line += f" {q['service'] / q['faiss']:.2f} |" if "faiss" in keys else ""
        print(line)
    print(f"\nservice indices identical to in-process torch's: {all(r['service_torch_identical'] for r in rows)}")
    print(f"({info['nproc']} x {info['cpu']}; load average {info['loadavg']})")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump({"bench": "w4", "corpus_rows": ns.corpus_rows, "dim": ns.dim, "k": ns.k, "device": ns.device,
                       "machine": info, "rows": rows}, f, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
