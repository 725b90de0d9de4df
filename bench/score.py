"""Exact cosine top-k three ways on the same data: the service end to end, the same scoring core
in-process, and faiss IndexFlatIP; checked against a float64 numpy brute force.

    python bench/score.py                                   # 100k x 384, 1024 queries (< 60 s on 2 cores)
    python bench/score.py --corpus-rows 1000000 --queries 2048 --verify-queries 512

The server is built by cosserve.server.edge.app.build_server in a child process of its own, so its
peak resident memory (psutil samples and the kernel's VmHWM) is the server's alone. The corpus
is fed once (streamed), then the queries are streamed in --batch-size batches over one ScoreTopK
call. Each path runs --repeat times, interleaved; the table gives the best (least disturbed by
other work on the machine) and the median. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

# The float64 reference works through the corpus in chunks of this many rows.
_REFERENCE_CHUNK_ROWS = 65536
_REFERENCE_QUERY_ROWS = 256
# Index swaps are allowed only where the float64 scores differ by less than float32 resolves.
_NEAR_TIE = 1e-6
_SCORE_TOLERANCE = 1e-5


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python bench/score.py",
        description="Queries/s of exact cosine top-k: cosserve end to end vs in-process torch vs faiss IndexFlatIP.",
    )
    parser.add_argument("--corpus-rows", type=int, default=100_000, help="M [default 100000]")
    parser.add_argument("--dim", type=int, default=384, help="D [default 384]")
    parser.add_argument("--queries", type=int, default=1024, help="N [default 1024]")
    parser.add_argument("--k", type=int, default=10, help="[default 10]")
    parser.add_argument("--batch-size", type=int, default=256, help="queries per streamed batch [default 256]")
    parser.add_argument("--device", default="cpu", help="device of the session and of the torch path [default cpu]")
    parser.add_argument(
        "--verify-queries", type=int, default=None, help="queries checked against float64 numpy [default all]"
    )
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each path, interleaved [default 3]")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="time budget of one run of a path [default 300]")
    parser.add_argument("--skip-faiss", action="store_true", help="leave out the faiss path")
    parser.add_argument(
        "--faiss-blas-threshold",
        type=int,
        default=20,
        help="faiss.cvar.distance_compute_blas_threshold [default 20: faiss 1.15's own default keeps "
        "256-query batches off its BLAS path, about 8x slower here]",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser


# ---- the server, in a process of its own ---------------------------------------------------


def _serve(conn: Connection, device: str, max_session_bytes: int) -> None:
    from cosserve.server.edge.app import build_server
    from cosserve.server.settings import OFF, Settings

    running = build_server(Settings(host="127.0.0.1", port=0, http_port=OFF, device=device, max_session_bytes=max_session_bytes))
    conn.send(running.address)
    conn.recv()  # until the bench says stop
    running.stop(0)


class MemoryPeak:
    """Samples a process's RSS with psutil until stopped; the peak also reads the kernel's VmHWM."""

    def __init__(self, pid: int, interval_s: float = 0.01) -> None:
        import psutil

        self.pid = pid
        self._process = psutil.Process(pid)
        self._interval = interval_s
        self._stop = threading.Event()
        self.sampled = 0
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.sampled = max(self.sampled, self._process.memory_info().rss)
            except Exception:  # noqa: BLE001  (the process is gone)
                return

    def high_water_mark(self) -> int | None:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def stop(self) -> int:
        peak = max(self.sampled, self.high_water_mark() or 0)
        self._stop.set()
        self._thread.join(timeout=5)
        return peak


# ---- the three paths -----------------------------------------------------------------------
# Each path is prepared once (corpus fed / moved / indexed), then timed over every query in
# --batch-size batches, --repeat times, the paths interleaved so that interference from other
# work on the machine hits all three alike.


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


def _timed(batches: Iterator[tuple[np.ndarray, np.ndarray]], max_seconds: float) -> dict[str, Any]:
    scores, indices = [], []
    started = time.perf_counter()
    for batch_scores, batch_indices in batches:
        scores.append(batch_scores)
        indices.append(batch_indices)
        if time.perf_counter() - started > max_seconds:
            break  # for the service, closing the stream cancels it
    elapsed = time.perf_counter() - started
    done = sum(len(s) for s in scores)
    return {"qps": done / elapsed, "seconds": elapsed, "queries": done,
            "scores": np.concatenate(scores), "indices": np.concatenate(indices)}


class ServicePath:
    """The service end to end: corpus fed once (streamed), queries over one ScoreTopK stream."""

    name = "cosserve service (gRPC, end to end)"

    def __init__(self, address: str, corpus: np.ndarray, ns: argparse.Namespace) -> None:
        from cosserve import Client

        self.ns = ns
        self.client = Client(address, timeout=120.0)
        self.session = self.client.session(ns.device)
        started = time.perf_counter()
        self.session.feed_blob("C", corpus)
        self.feed_s = time.perf_counter() - started

    def run(self, queries: np.ndarray) -> dict[str, Any]:
        ns = self.ns
        return _timed(self.session.iter_top_k(queries, "C", ns.k, batch_size=ns.batch_size), ns.max_seconds)

    def close(self) -> None:
        self.session.close()
        self.client.close()


class TorchPath:
    """The same scoring core called in this process, the corpus norms cached as the service does."""

    name = "in-process torch (same core)"

    def __init__(self, corpus: np.ndarray, ns: argparse.Namespace) -> None:
        import torch

        from cosserve.server.compute import similarity
        from cosserve.server.state.norm_cache import NormCache

        self.ns, self.similarity, self.torch = ns, similarity, torch
        self.device = torch.device(ns.device)
        self.corpus = torch.from_numpy(corpus).to(self.device)
        self.norms = NormCache()
        self.norms.get(self.corpus, self.similarity.inverse_norms)

    def _batches(self, queries: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for rows in _batches(len(queries), self.ns.batch_size):
            q = self.similarity.to_device(self.torch.from_numpy(queries[rows]), self.device)
            s, i = self.similarity.top_k(q, self.corpus, self.ns.k, self.norms.get(self.corpus, self.similarity.inverse_norms))
            yield s.cpu().numpy(), i.cpu().numpy()

    def run(self, queries: np.ndarray) -> dict[str, Any]:
        return _timed(self._batches(queries), self.ns.max_seconds)


class FaissPath:
    """faiss IndexFlatIP over L2-normalized vectors (inner product = cosine); queries normalized per batch."""

    def __init__(self, corpus: np.ndarray, ns: argparse.Namespace) -> None:
        import faiss

        self.ns, self.faiss = ns, faiss
        faiss.cvar.distance_compute_blas_threshold = ns.faiss_blas_threshold  # faiss at its fastest
        normalized = np.array(corpus, dtype=np.float32, copy=True)
        faiss.normalize_L2(normalized)
        self.index = faiss.IndexFlatIP(corpus.shape[1])
        self.index.add(normalized)
        self.name = f"faiss IndexFlatIP ({faiss.omp_get_max_threads()} threads, BLAS from {ns.faiss_blas_threshold} queries)"

    def _batches(self, queries: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for rows in _batches(len(queries), self.ns.batch_size):
            q = np.array(queries[rows], dtype=np.float32, copy=True)
            self.faiss.normalize_L2(q)
            yield self.index.search(q, self.ns.k)

    def run(self, queries: np.ndarray) -> dict[str, Any]:
        return _timed(self._batches(queries), self.ns.max_seconds)


# ---- the float64 reference -----------------------------------------------------------------


def reference_top_k(corpus: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by (-score, index) in float64 with the spec's norm floor; corpus and queries in blocks."""
    out_s = np.empty((len(queries), k))
    out_i = np.empty((len(queries), k), np.int64)
    for qs in range(0, len(queries), _REFERENCE_QUERY_ROWS):
        q = queries[qs : qs + _REFERENCE_QUERY_ROWS].astype(np.float64)
        q /= np.sqrt(np.maximum(np.einsum("nd,nd->n", q, q), 1e-12))[:, None]
        best_s, best_i = np.empty((len(q), 0)), np.empty((len(q), 0), np.int64)
        for cs in range(0, len(corpus), _REFERENCE_CHUNK_ROWS):
            c = corpus[cs : cs + _REFERENCE_CHUNK_ROWS].astype(np.float64)
            c /= np.sqrt(np.maximum(np.einsum("md,md->m", c, c), 1e-12))[:, None]
            s = q @ c.T
            top = np.argpartition(-s, min(k, s.shape[1]) - 1, axis=1)[:, :k]
            s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], 1)
            i = np.concatenate([best_i, top + cs], 1)
            order = np.lexsort((i, -s), axis=1)[:, :k]  # by -score, then index
            best_s, best_i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
        out_s[qs : qs + len(q)], out_i[qs : qs + len(q)] = best_s, best_i
    return out_s, out_i


def reference_scores(corpus: np.ndarray, queries: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """float64 cosine of each query with the corpus rows named in its row of `indices`."""
    q = queries.astype(np.float64)
    c = corpus[indices.reshape(-1)].astype(np.float64).reshape(*indices.shape, -1)
    qn = np.sqrt(np.maximum(np.einsum("nd,nd->n", q, q), 1e-12))
    cn = np.sqrt(np.maximum(np.einsum("nkd,nkd->nk", c, c), 1e-12))
    return np.einsum("nd,nkd->nk", q, c) / (qn[:, None] * cn)


def verify(corpus: np.ndarray, queries: np.ndarray, got: dict[str, Any], k: int) -> dict[str, Any]:
    """Compare with the float64 brute force: indices equal except swaps inside near-ties, scores close."""
    n = len(queries)
    want_s, want_i = reference_top_k(corpus, queries, k)
    scores, indices = got["scores"][:n].astype(np.float64), got["indices"][:n]
    differ = indices != want_i
    picked = reference_scores(corpus, queries, indices)  # what the returned rows really score
    near_tie = differ & (np.abs(picked - want_s) <= _NEAR_TIE)
    return {
        "queries": n,
        "indices_equal": int((~differ).sum()),
        "near_tie_swaps": int(near_tie.sum()),
        "wrong": int((differ & ~near_tie).sum()),
        "max_score_error": float(np.abs(scores - want_s).max()) if n else 0.0,
        "ok": bool(not (differ & ~near_tie).any() and (np.abs(scores - want_s) <= _SCORE_TOLERANCE).all()),
    }


# ---- main ----------------------------------------------------------------------------------


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main(argv: Sequence[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    import torch

    rng = np.random.default_rng(ns.seed)
    started = time.perf_counter()
    corpus = rng.standard_normal((ns.corpus_rows, ns.dim), dtype=np.float32)
    queries = rng.standard_normal((ns.queries, ns.dim), dtype=np.float32)
    print(f"data: corpus {corpus.shape} float32 ({corpus.nbytes / 2**20:.0f} MiB), queries {queries.shape}, "
          f"k={ns.k}, batches of {ns.batch_size}; generated in {time.perf_counter() - started:.1f} s", file=sys.stderr)

    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    server = context.Process(target=_serve, args=(child, ns.device, corpus.nbytes + 2**30), daemon=True)
    server.start()
    if not parent.poll(120):
        server.kill()
        print("the server did not start within 120 s", file=sys.stderr)
        return 1
    memory = MemoryPeak(server.pid)
    service = ServicePath(parent.recv(), corpus, ns)
    try:
        paths: list[Any] = [service, TorchPath(corpus, ns)]
        if not ns.skip_faiss:
            paths.append(FaissPath(corpus, ns))
        for path in paths:  # warm-up: first calls, the service's norm cache
            path.run(queries[: ns.batch_size])
        runs: dict[str, list[dict[str, Any]]] = {path.name: [] for path in paths}
        for repeat in range(ns.repeat):
            for path in paths:
                result = path.run(queries)
                runs[path.name].append(result)
                print(f"  run {repeat + 1}/{ns.repeat} {path.name}: {result['qps']:.0f} queries/s", file=sys.stderr)
        peak_rss = memory.stop()
    finally:
        service.close()
        parent.send("stop")
        server.join(30)
        if server.is_alive():
            server.kill()

    names = [path.name for path in paths]
    best = {name: max(runs[name], key=lambda r: r["qps"]) for name in names}
    median = {name: float(np.median([r["qps"] for r in runs[name]])) for name in names}
    service_result, torch_result = best[names[0]], best[names[1]]
    faiss_result = best[names[2]] if len(names) > 2 else None

    n_verify = min(service_result["queries"], ns.verify_queries if ns.verify_queries is not None else ns.queries)
    started = time.perf_counter()
    check = verify(corpus, queries[:n_verify], service_result, ns.k)
    check["seconds"] = time.perf_counter() - started
    n_same = min(service_result["queries"], torch_result["queries"])
    torch_same = bool(np.array_equal(service_result["indices"][:n_same], torch_result["indices"][:n_same]))
    faiss_agree = None
    if faiss_result is not None:
        n_flat = min(service_result["queries"], faiss_result["queries"])
        faiss_agree = float(np.mean(service_result["indices"][:n_flat] == faiss_result["indices"][:n_flat]))
    bound = corpus.nbytes * 1.5 + 256 * 2**20

    def ratio(of: dict[str, float], a: str, b: str) -> float:
        return of[a] / of[b]

    best_qps = {name: best[name]["qps"] for name in names}
    mib = 2**20
    print(f"\nmachine: {_machine()}, torch {torch.__version__} ({torch.get_num_threads()} threads), device {ns.device}")
    print(f"corpus {ns.corpus_rows} x {ns.dim} float32, {ns.queries} queries, k={ns.k}, batches of {ns.batch_size}, "
          f"best and median of {ns.repeat} runs\n")
    print("| path | queries/s (best) | queries/s (median) |\n|---|---:|---:|")
    for name in names:
        print(f"| {name} | {best_qps[name]:.0f} | {median[name]:.0f} |")
    line = f"\nservice / torch = {ratio(best_qps, names[0], names[1]):.2f} (medians {ratio(median, names[0], names[1]):.2f})"
    if faiss_result is not None:
        line += f", service / faiss = {ratio(best_qps, names[0], names[2]):.2f} (medians {ratio(median, names[0], names[2]):.2f})"
    print(line)
    print(f"corpus feed (streamed, once): {service.feed_s:.2f} s")
    print(f"server peak RSS {peak_rss / mib:.0f} MiB vs bound corpus x 1.5 + 256 MiB = {bound / mib:.0f} MiB: "
          f"{'within' if peak_rss <= bound else 'ABOVE'}")
    print(f"check vs float64 numpy ({check['queries']} queries x k={ns.k}): {check['indices_equal']} indices equal, "
          f"{check['near_tie_swaps']} swaps within near-ties (|Δ| <= {_NEAR_TIE}), {check['wrong']} wrong; "
          f"max score error {check['max_score_error']:.1e} (<= {_SCORE_TOLERANCE}): {'OK' if check['ok'] else 'FAILED'}")
    print(f"in-process torch indices identical to the service's: {torch_same}"
          + ("" if faiss_agree is None else f"; faiss agrees on {faiss_agree:.4%} of indices"))
    keys = ["service", "torch", "faiss"][: len(names)]
    summary = {
        "bench": "score",
        "corpus_rows": ns.corpus_rows, "dim": ns.dim, "queries": ns.queries, "k": ns.k,
        "batch_size": ns.batch_size, "device": ns.device, "repeat": ns.repeat,
        "qps_best": {key: best_qps[name] for key, name in zip(keys, names)},
        "qps_median": {key: median[name] for key, name in zip(keys, names)},
        "qps_runs": {key: [r["qps"] for r in runs[name]] for key, name in zip(keys, names)},
        "service_over_torch": ratio(best_qps, names[0], names[1]),
        "service_over_faiss": ratio(best_qps, names[0], names[2]) if faiss_result is not None else None,
        "feed_s": service.feed_s,
        "server_peak_rss_bytes": peak_rss, "rss_bound_bytes": bound, "rss_within_bound": peak_rss <= bound,
        "verify": check, "torch_indices_identical": torch_same, "faiss_index_agreement": faiss_agree,
        "machine": _machine(),
    }
    print(json.dumps(summary))
    return 0 if check["ok"] and peak_rss <= bound else 1


if __name__ == "__main__":
    sys.exit(main())
