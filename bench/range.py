"""Exact cosine range search (every corpus row with cosine >= min_score) three ways on the same
data: the service end to end (ScoreRange), the same core in-process, and faiss IndexFlatIP's
range_search; the service's rows are checked against faiss's (away from min_score's float32 margin).

    python -m bench.range                                           # 100k x 384, 1024 queries
    python -m bench.range --corpus-rows 1000000 --queries 2048 --min-score 0.2

The corpus is Gaussian with planted near-duplicates (each query has some rows close to it), so
every query has hits at the default min_score. The server runs in a child process (bench.score's);
each path runs --repeat times, interleaved, and the table gives the best. Prints a table and one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from bench.score import _batches, _machine, _serve

# Rows whose float64 cosine lies this close to min_score may be decided either way by float32.
_MARGIN = 1e-5


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.range",
        description="Queries/s of exact cosine range search: cosserve end to end vs in-process vs faiss IndexFlatIP.",
    )
    parser.add_argument("--corpus-rows", type=int, default=100_000, help="M [default 100000]")
    parser.add_argument("--dim", type=int, default=384, help="D [default 384]")
    parser.add_argument("--queries", type=int, default=1024, help="N [default 1024]")
    parser.add_argument("--min-score", type=float, default=0.5, help="[default 0.5]")
    parser.add_argument("--duplicates", type=int, default=20, help="near-duplicates of each query planted in the corpus [default 20]")
    parser.add_argument("--batch-size", type=int, default=256, help="queries per streamed batch [default 256]")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each path, interleaved [default 3]")
    parser.add_argument("--skip-faiss", action="store_true", help="leave out the faiss path")
    parser.add_argument("--faiss-blas-threshold", type=int, default=20, help="as bench/score.py [default 20]")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def make_data(ns: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """A Gaussian corpus and queries; `duplicates` rows per query are the query plus noise (cosine ~0.7-0.9)."""
    rng = np.random.default_rng(ns.seed)
    corpus = rng.standard_normal((ns.corpus_rows, ns.dim), dtype=np.float32)
    queries = rng.standard_normal((ns.queries, ns.dim), dtype=np.float32)
    planted = min(ns.corpus_rows, ns.queries * ns.duplicates)
    rows = rng.choice(ns.corpus_rows, planted, replace=False)
    noise = rng.uniform(0.4, 1.0, (planted, 1)).astype(np.float32)
    corpus[rows] = queries[np.arange(planted) % ns.queries] + noise * rng.standard_normal((planted, ns.dim), dtype=np.float32)
    return corpus, queries


def _timed(results: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Runs a path: (lims, indices, scores) per batch, joined; queries/s over the whole run."""
    started = time.perf_counter()
    parts = list(results)
    elapsed = time.perf_counter() - started
    lims = np.concatenate([[0]] + [p[0][1:] + off for p, off in zip(parts, np.cumsum([0] + [p[0][-1] for p in parts[:-1]]))])
    return {"seconds": elapsed, "lims": lims.astype(np.int64), "indices": np.concatenate([p[1] for p in parts]),
            "scores": np.concatenate([p[2] for p in parts]), "queries": len(lims) - 1}  # fmt: skip


class ServicePath:
    name = "cosserve service (ScoreRange, end to end)"

    def __init__(self, address: str, corpus: np.ndarray, ns: argparse.Namespace) -> None:
        from cosserve import Client

        self.ns, self.client = ns, Client(address, timeout=120.0)
        self.session = self.client.session("cpu")
        self.session.feed_blob("C", corpus)
        self.session.range_search(corpus[:1], "C", 2.0)  # norms computed once, outside the timing

    def run(self, queries: np.ndarray) -> dict[str, Any]:
        results = self.session.iter_range_search(queries, "C", self.ns.min_score, batch_size=self.ns.batch_size)
        return _timed((r.lims, r.indices, r.scores) for r in results)


class InProcessPath:
    name = "cosserve core in-process (range_search.range_search)"

    def __init__(self, corpus: np.ndarray, ns: argparse.Namespace) -> None:
        import torch

        from cosserve.server.compute import range_search, similarity

        self.ns, self.torch, self.range_search = ns, torch, range_search
        self.corpus = torch.from_numpy(corpus)
        self.norms = similarity.inverse_norms(self.corpus)

    def _batches(self, queries: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for rows in _batches(len(queries), self.ns.batch_size):
            hits = self.range_search.range_search(
                self.torch.from_numpy(queries[rows]), self.corpus, self.ns.min_score, 0, self.norms, max_hits=2**40
            )
            yield hits.lims.numpy(), hits.indices.numpy(), hits.scores.numpy()

    def run(self, queries: np.ndarray) -> dict[str, Any]:
        return _timed(self._batches(queries))


class FaissPath:
    def __init__(self, corpus: np.ndarray, ns: argparse.Namespace) -> None:
        import faiss

        self.ns, self.faiss = ns, faiss
        faiss.cvar.distance_compute_blas_threshold = ns.faiss_blas_threshold
        normalized = np.array(corpus, dtype=np.float32, copy=True)
        faiss.normalize_L2(normalized)
        self.index = faiss.IndexFlatIP(corpus.shape[1])
        self.index.add(normalized)
        self.name = f"faiss IndexFlatIP.range_search ({faiss.omp_get_max_threads()} threads)"

    def _batches(self, queries: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for rows in _batches(len(queries), self.ns.batch_size):
            q = np.array(queries[rows], dtype=np.float32, copy=True)
            self.faiss.normalize_L2(q)
            lims, scores, indices = self.index.range_search(q, self.ns.min_score)
            yield lims.astype(np.int64), indices, scores  # faiss leaves each query's rows unordered

    def run(self, queries: np.ndarray) -> dict[str, Any]:
        return _timed(self._batches(queries))


def agreement(corpus: np.ndarray, queries: np.ndarray, a: dict[str, Any], b: dict[str, Any], tau: float) -> float:
    """Fraction of queries whose row sets agree once rows within _MARGIN of tau (float64) are set aside."""
    agree = 0
    for i in range(a["queries"]):
        rows_a = set(a["indices"][a["lims"][i] : a["lims"][i + 1]].tolist())
        rows_b = set(b["indices"][b["lims"][i] : b["lims"][i + 1]].tolist())
        differ = np.array(sorted(rows_a ^ rows_b), dtype=np.int64)
        if differ.size:
            q = queries[i].astype(np.float64)
            c = corpus[differ].astype(np.float64)
            cos = c @ q / np.linalg.norm(c, axis=1) / np.linalg.norm(q)
            if (np.abs(cos - tau) > _MARGIN).any():
                continue
        agree += 1
    return agree / max(1, a["queries"])


def main(argv: Sequence[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    corpus, queries = make_data(ns)
    parent, child = multiprocessing.Pipe()
    server = multiprocessing.get_context("spawn").Process(target=_serve, args=(child, "cpu", 64 * 1024**3), daemon=True)
    server.start()
    try:
        address = parent.recv()
        paths: list[Any] = [ServicePath(address, corpus, ns), InProcessPath(corpus, ns)]
        if not ns.skip_faiss:
            paths.append(FaissPath(corpus, ns))
        best: dict[str, dict[str, Any]] = {}
        for _ in range(ns.repeat):
            for path in paths:
                result = path.run(queries)
                if path.name not in best or result["seconds"] < best[path.name]["seconds"]:
                    best[path.name] = result
        paths[0].session.close()
        paths[0].client.close()
    finally:
        parent.send("stop")
        server.join(30)
    service = best[paths[0].name]
    qps = {name: r["queries"] / r["seconds"] for name, r in best.items()}
    hits = int(service["lims"][-1])
    print(f"range search, {ns.corpus_rows} x {ns.dim} float32, {ns.queries} queries, min_score {ns.min_score}: "
          f"{hits} rows ({hits / ns.queries:.1f} per query); {_machine()}")  # fmt: skip
    print("| path | queries/s | vs service |")
    print("| --- | ---: | ---: |")
    for name, value in qps.items():
        print(f"| {name} | {value:.1f} | {qps[paths[0].name] / value:.2f}x |")
    agree = {name: agreement(corpus, queries, service, r, ns.min_score) for name, r in best.items() if name != paths[0].name}
    for name, value in agree.items():
        print(f"rows agree with {name}: {value:.4f} of queries")
    print(json.dumps({"bench": "range", "params": vars(ns), "qps": qps, "hits": hits, "agreement": agree}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
