"""Batch jobs end to end (`cosserve score topk|pairs|threshold` on Parquet files, a real server
process, Parquet out) against the service's own scoring rate, the same work in-process (pyarrow
plus torch), and, for threshold, faiss `range_search` on IndexFlatIP; with the job client's peak
memory at two input sizes.

    python -m bench.jobs                                          # 50k x 384 corpus, < 2 min on 2 cores
    python -m bench.jobs --rows 1000000 --queries 4096 --pairs 1000000

- **job**: the real command in a process of its own (its RSS sampled every 10 ms); its rate is
  that of its scoring phase (the summary line's seconds: reading the queries, sending them,
  scoring, writing the parts, overlapped), the corpus upload excluded as a one-off.
- **service**: the same server scoring the same rows from memory (`Session.top_k`,
  `Session.range_search`, `Client.compute` CosineSimilarity with as many calls in flight as the
  job): what the job can at most reach. Target: job / service >= 0.9.
- **in-process**: pyarrow reads the same files, torch scores them with the server's own core
  (`cosserve.server.compute.similarity.top_k`, `range_search.range_search`, row-wise cosine),
  pyarrow writes the rows: the same work with no service.
- **faiss**: `IndexFlatIP` over L2-normalized rows, `range_search` of the normalized queries
  (threshold only). Target: job / faiss >= 1.0.
- **memory**: the job client's peak RSS at --memory-fraction of the queries (pairs) and at all of
  them: flat in the input size when the two are close.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench.servers import start_cosserve

__all__ = ["main"]

_CHUNK = 65536  # rows generated and written at a time
_SECONDS = re.compile(r", (\d+\.\d\d) s, ")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.jobs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=50_000, help="corpus rows [50,000]")
    parser.add_argument("--dim", type=int, default=384, help="width [384]")
    parser.add_argument("--queries", type=int, default=2048, help="queries of topk and threshold [2,048]")
    parser.add_argument("--pairs", type=int, default=200_000, help="pairs of the pairs job [200,000]")
    parser.add_argument("--k", type=int, default=10, help="top-k's k [10]")
    parser.add_argument("--min-score", type=float, default=0.2, help="threshold's least cosine [0.2: about 3e-5 of random 384-wide pairs]")
    parser.add_argument("--memory-fraction", type=float, default=0.25, help="the smaller input of the memory check [0.25]")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON here")
    return parser


# ---- files --------------------------------------------------------------------------------------


def _write(path: Path, rows: int, dim: int, seed: int, ids: str | None) -> None:
    """A Parquet file of `rows` random normal float32 vectors ("embedding", fixed_size_list) with
    int64 or string ids ("id"), written in chunks."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    schema_fields = [("embedding", pa.list_(pa.float32(), dim))]
    if ids == "int":
        schema_fields.insert(0, ("id", pa.int64()))
    elif ids == "str":
        schema_fields.insert(0, ("id", pa.string()))
    with pq.ParquetWriter(path, pa.schema(schema_fields)) as writer:
        for start in range(0, rows, _CHUNK):
            n = min(_CHUNK, rows - start)
            x = rng.standard_normal((n, dim), dtype=np.float32)
            columns: dict[str, Any] = {"embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim)}
            if ids == "int":
                columns = {"id": pa.array(np.arange(start, start + n) * 7), **columns}
            elif ids == "str":
                columns = {"id": pa.array([f"q{i}" for i in range(start, start + n)]), **columns}
            writer.write_table(pa.table(columns), row_group_size=_CHUNK)


def _read(path: Path) -> np.ndarray:
    from cosserve.datasets import open_source

    source = open_source(str(path))
    return np.concatenate([b.vectors for b in source.batches(rows=_CHUNK)])


# ---- the job as a user runs it -----------------------------------------------------------------


def _job(args: list[str], out: Path) -> dict[str, float]:
    """Run `cosserve score ...` in its own process; its scoring seconds, wall seconds, peak RSS."""
    argv = [sys.executable, "-m", "cosserve.cli", "score", *args, "--device", "cpu", "--no-progress", "--out", str(out)]
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    process = psutil.Process(proc.pid)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            try:
                peak = max(peak, process.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate(timeout=3600)
    stop.set()
    sampler.join()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {err}")
    seconds = float(_SECONDS.search(err.strip().splitlines()[-1]).group(1))  # type: ignore[union-attr]
    return {"seconds": max(seconds, 0.005), "wall": wall, "peak_rss": peak}  # the summary rounds to 10 ms


# ---- in-process: pyarrow + torch ---------------------------------------------------------------


def _inprocess_topk(corpus: np.ndarray, queries_path: Path, k: int, out: Path) -> float:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from cosserve.datasets import open_source
    from cosserve.server.compute import similarity

    c = torch.from_numpy(corpus)
    norms = similarity.inverse_norms(c)
    started = time.perf_counter()
    with pq.ParquetWriter(out, pa.schema([("query_id", pa.string()), ("rank", pa.int32()), ("corpus_id", pa.int64()), ("score", pa.float32())])) as w:
        for batch in open_source(str(queries_path)).batches(rows=256):
            s, i = similarity.top_k(torch.from_numpy(batch.vectors), c, k, norms)
            w.write_table(pa.table({
                "query_id": pa.array(np.repeat(batch.ids, k), pa.string()), "rank": np.tile(np.arange(k, dtype=np.int32), len(batch.ids)),
                "corpus_id": i.numpy().ravel() * 7, "score": s.numpy().ravel(),
            }))  # fmt: skip
    return time.perf_counter() - started


def _inprocess_pairs(a_path: Path, b_path: Path, out: Path) -> float:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from cosserve.datasets import open_source

    started = time.perf_counter()
    a, b = open_source(str(a_path)), open_source(str(b_path))
    with pq.ParquetWriter(out, pa.schema([("a_id", pa.int64()), ("b_id", pa.int64()), ("score", pa.float32())])) as w:
        for x, y in zip(a.batches(rows=_CHUNK), b.batches(rows=_CHUNK)):
            tx, ty = torch.from_numpy(x.vectors), torch.from_numpy(y.vectors)
            s = (tx * ty).sum(1) / (tx.norm(dim=1).clamp_min(1e-6) * ty.norm(dim=1).clamp_min(1e-6))
            w.write_table(pa.table({"a_id": x.ids, "b_id": y.ids, "score": s.numpy()}))
    return time.perf_counter() - started


def _inprocess_threshold(corpus: np.ndarray, queries_path: Path, tau: float, out: Path) -> float:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from cosserve.datasets import open_source
    from cosserve.server.compute import range_search, similarity

    c = torch.from_numpy(corpus)
    norms = similarity.inverse_norms(c)
    started = time.perf_counter()
    with pq.ParquetWriter(out, pa.schema([("query_id", pa.string()), ("corpus_id", pa.int64()), ("score", pa.float32())])) as w:
        for batch in open_source(str(queries_path)).batches(rows=256):
            hits = range_search.range_search(torch.from_numpy(batch.vectors), c, tau, 0, norms, max_hits=1 << 40)
            counts = np.diff(hits.lims.numpy())
            w.write_table(pa.table({
                "query_id": pa.array(np.repeat(batch.ids, counts), pa.string()), "corpus_id": hits.indices.numpy() * 7,
                "score": hits.scores.numpy(),
            }))  # fmt: skip
    return time.perf_counter() - started


def _faiss_threshold(corpus: np.ndarray, queries: np.ndarray, tau: float) -> tuple[float, int] | None:
    try:
        import faiss
    except ImportError:  # the bench extra: pip install -e ".[bench]"
        return None

    index = faiss.IndexFlatIP(corpus.shape[1])
    unit = corpus / np.linalg.norm(corpus, axis=1, keepdims=True)
    index.add(unit.astype(np.float32))
    started = time.perf_counter()
    q = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    lims, _, _ = index.range_search(q, tau)
    return time.perf_counter() - started, int(lims[-1])


# ---- the run ------------------------------------------------------------------------------------


def run(ns: argparse.Namespace, work: Path) -> dict[str, Any]:
    from cosserve import Client

    dim = ns.dim
    paths = {name: work / f"{name}.parquet" for name in ("corpus", "queries", "queries_small", "a", "b", "a_small", "b_small")}
    small_q, small_p = max(1, int(ns.queries * ns.memory_fraction)), max(1, int(ns.pairs * ns.memory_fraction))
    _write(paths["corpus"], ns.rows, dim, 1, "int")
    _write(paths["queries"], ns.queries, dim, 2, "str")
    _write(paths["queries_small"], small_q, dim, 2, "str")
    _write(paths["a"], ns.pairs, dim, 3, None)
    _write(paths["b"], ns.pairs, dim, 4, None)
    _write(paths["a_small"], small_p, dim, 3, None)
    _write(paths["b_small"], small_p, dim, 4, None)
    corpus, queries = _read(paths["corpus"]), _read(paths["queries"])
    results: dict[str, Any] = {"rows": ns.rows, "dim": dim, "queries": ns.queries, "pair_count": ns.pairs, "k": ns.k, "min_score": ns.min_score}
    with start_cosserve(allow_shm=False) as server:
        address = server.address
        common = ["--server", address]
        topk = ["topk", "--corpus", str(paths["corpus"]), "--k", str(ns.k), *common]
        job = _job([*topk, "--queries", str(paths["queries"])], work / "topk.parquet")
        job_small = _job([*topk, "--queries", str(paths["queries_small"])], work / "topk_small.parquet")
        with Client(address) as client, client.session("cpu") as session:
            session.feed_blob("C", corpus)
            started = time.perf_counter()
            session.top_k(queries, "C", ns.k, batch_size=256)
            service = time.perf_counter() - started
            started = time.perf_counter()
            found = session.range_search(queries, "C", ns.min_score, batch_size=256)
            service_range = time.perf_counter() - started
        inprocess = _inprocess_topk(corpus, paths["queries"], ns.k, work / "topk_inprocess.parquet")
        results["topk"] = {"job": ns.queries / job["seconds"], "service": ns.queries / service, "inprocess": ns.queries / inprocess,
                           "job_wall_s": job["wall"], "peak_rss": job["peak_rss"], "peak_rss_small": job_small["peak_rss"]}

        pairs = ["pairs", *common]
        job = _job([*pairs, "--a", str(paths["a"]), "--b", str(paths["b"])], work / "pairs.parquet")
        job_small = _job([*pairs, "--a", str(paths["a_small"]), "--b", str(paths["b_small"])], work / "pairs_small.parquet")
        a, b = _read(paths["a"]), _read(paths["b"])
        rows = (8 << 20) // (2 * dim * 4) - 64  # as the job: both inputs in one Compute message
        with Client(address) as client, concurrent.futures.ThreadPoolExecutor(4) as pool:
            started = time.perf_counter()
            futures = [pool.submit(client.compute, "CosineSimilarity", {"X": a[s : s + rows], "Y": b[s : s + rows]}, ["S"], device="cpu")
                       for s in range(0, ns.pairs, rows)]  # fmt: skip
            for future in futures:
                future.result()
            service = time.perf_counter() - started
        del a, b
        inprocess = _inprocess_pairs(paths["a"], paths["b"], work / "pairs_inprocess.parquet")
        results["pairs"] = {"job": ns.pairs / job["seconds"], "service": ns.pairs / service, "inprocess": ns.pairs / inprocess,
                            "job_wall_s": job["wall"], "peak_rss": job["peak_rss"], "peak_rss_small": job_small["peak_rss"]}

        threshold = ["threshold", "--corpus", str(paths["corpus"]), "--min-score", str(ns.min_score), *common]
        job = _job([*threshold, "--queries", str(paths["queries"])], work / "threshold.parquet")
        inprocess = _inprocess_threshold(corpus, paths["queries"], ns.min_score, work / "threshold_inprocess.parquet")
        results["threshold"] = {"job": ns.queries / job["seconds"], "service": ns.queries / service_range, "inprocess": ns.queries / inprocess,
                                "job_wall_s": job["wall"], "peak_rss": job["peak_rss"], "hits": int(found.lims[-1])}  # fmt: skip
        faiss = _faiss_threshold(corpus, queries, ns.min_score)
        if faiss is not None:
            results["threshold"].update(faiss=ns.queries / faiss[0], faiss_hits=faiss[1])
    return results


def _table(r: dict[str, Any]) -> str:
    unit = {"topk": "queries/s", "pairs": "pairs/s", "threshold": "queries/s"}
    lines = [
        f"{r['rows']:,} x {r['dim']} corpus, {r['queries']:,} queries, {r['pair_count']:,} pairs, k={r['k']}, min_score={r['min_score']}",
        "",
        "| job | rate | job | service | in-process (pyarrow + torch) | faiss | job / service | job / in-process | job / faiss |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ("topk", "pairs", "threshold"):
        x = r[name]
        faiss = f"{x['faiss']:,.0f}" if "faiss" in x else "-"
        vs_faiss = f"{x['job'] / x['faiss']:.2f}" if "faiss" in x else "-"
        lines.append(
            f"| {name} | {unit[name]} | {x['job']:,.0f} | {x['service']:,.0f} | {x['inprocess']:,.0f} | {faiss} | "
            f"{x['job'] / x['service']:.2f} | {x['job'] / x['inprocess']:.2f} | {vs_faiss} |"
        )
    lines.append("")
    for name in ("topk", "pairs"):
        x = r[name]
        lines.append(f"{name} client peak RSS: {x['peak_rss_small'] / 2**20:,.0f} MiB at a quarter of the input, {x['peak_rss'] / 2**20:,.0f} MiB at all of it")
    t = r["threshold"]
    lines.append(f"threshold hits: service {t['hits']:,}, faiss {t.get('faiss_hits', '-')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    # Arrow's buffers are read-only; torch only reads them here.
    warnings.filterwarnings("ignore", "The given NumPy array is not writable")
    with tempfile.TemporaryDirectory(prefix="cosserve-bench-jobs-") as folder:
        results = run(ns, Path(folder))
    print(_table(results))
    print(json.dumps(results))
    if ns.json:
        Path(ns.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    sys.exit(main())
