"""`cosserve score topk|pairs|threshold`: batch cosine jobs over embedding files (.npy,
.safetensors, Parquet, folders of Parquet or .npy shards) via a server, results as Parquet part
files (resumable) or one .npz. `cosserve score --corpus C --queries Q ...` with no job is topk."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from cosserve.cli import jobs
from cosserve.cli.results import UsageError
from cosserve.datasets import DatasetError
from cosserve.errors import CosserveError, CosserveRpcError

__all__ = ["JOBS", "UsageError", "add_arguments", "default_job", "run"]

JOBS: dict[str, Callable[[argparse.Namespace, jobs.Summary], None]] = {
    "topk": jobs.run_topk,
    "pairs": jobs.run_pairs,
    "threshold": jobs.run_threshold,
}
# Rows of the driving input (queries, or --a) per part file, by job: about a million result rows.
_PART_ROWS = {"topk": 100_000, "pairs": 1_000_000, "threshold": 10_000}

_INPUTS = (
    "an (M, D) float16/32/64 matrix: a .npy file, a .safetensors file of one tensor (FILE:KEY for one of several), "
    "a .parquet file, or a folder of .parquet files or of .npy shards (read in sorted order as one matrix)"
)
_EPILOG = """\
inputs:
  Parquet rows hold a vector column (a list or fixed_size_list of float16/float32/float64) and
  optionally an id column (integers or strings); without one, the row number is the id. Without
  --vector-column/--id-column the columns are found by their types (among several id columns,
  the one named "id"); when that is ambiguous the job stops and says which flag to pass.
  --id-column '' takes row numbers as ids. Files are read in pieces, never whole.
outputs (--out's suffix chooses):
  .parquet  a folder of part files, one row per result, each written atomically as the job
            runs; --resume continues a job that stopped (Ctrl-C, kill, a lost server), skipping
            the parts written, and gives the same output as an uninterrupted run.
  .npz      one file written at the end, for small jobs.
exit status: 0 done, 1 a server refused, 2 bad inputs or flags, 130 interrupted (Ctrl-C).
"""


def default_job(argv: Sequence[str]) -> list[str]:
    """`score` followed by no job name means `score topk`: today's command line keeps working."""
    argv = list(argv)
    if argv and argv[0] == "score" and (len(argv) == 1 or argv[1] not in (*JOBS, "-h", "--help")):
        argv.insert(1, "topk")
    return argv


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        required=True,
        metavar="PATH",
        help="results: PATH.parquet, a folder of part files (resumable), or PATH.npz, one file at the end",
    )
    parser.add_argument("--resume", action="store_true", help="continue the job whose parts are in --out (a .parquet folder)")
    parser.add_argument("--vector-column", metavar="NAME", default=None, help="Parquet inputs' column of vectors [default: detected]")
    parser.add_argument(
        "--id-column", metavar="NAME", default=None, help="Parquet inputs' column of ids; '' for row numbers [default: detected]"
    )
    parser.add_argument(
        "--part-rows", type=int, default=None, metavar="N", help="rows of the driving input per part file [default: about 1M results a part]"
    )
    parser.add_argument(
        "--server",
        metavar="ADDR[,ADDR...]",
        default=None,
        help="host:port of a running server; several, comma-separated: topk shards the corpus over them, pairs "
        "spreads its calls over them; default: start one in this process",
    )
    parser.add_argument("--device", default="auto", help="session device: auto, cpu, cuda, cuda:N [default auto]")
    parser.add_argument(
        "--token",
        default=os.environ.get("COSSERVE_AUTH_TOKEN", ""),
        help="bearer token for a server started with one [env COSSERVE_AUTH_TOKEN]",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars of the corpus upload and the scoring on stderr [default: when stderr is a terminal]",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `score` command's jobs and their flags."""
    parser.epilog = _EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    kinds = parser.add_subparsers(dest="job", metavar="JOB", required=True)
    formatter = argparse.RawDescriptionHelpFormatter
    topk = kinds.add_parser(
        "topk",
        help="the k most similar corpus rows of each query (the default job)",
        description="Exact cosine top-k of each query among the corpus rows. Parquet columns: query_id, rank "
        "(0 = best), corpus_id, score; .npz arrays: scores (N, k), indices (N, k) and, with ids, query_ids and corpus_ids.",
        epilog=_EPILOG,
        formatter_class=formatter,
    )
    topk.add_argument("--corpus", required=True, metavar="PATH|@NAME", help=f"{_INPUTS}; or @NAME, the --server's shared corpus NAME")
    topk.add_argument("--queries", required=True, metavar="PATH", help="(N, D) queries, in any corpus layout (cast to the corpus dtype)")
    topk.add_argument("--k", type=int, default=10, help="corpus rows kept per query, 1 <= k <= M [default 10]")
    topk.add_argument("--batch-size", type=int, default=256, help="queries per streamed batch [default 256]")
    _common(topk)
    pairs = kinds.add_parser(
        "pairs",
        help="the cosine of each pair of rows of A and B",
        description="The cosine of each aligned pair (row i of A, row i of B), or, when both inputs have ids, of the rows "
        "with the same id (A's rows in order; rows of A with no id in B are left out). Streams any number of pairs "
        "in bounded memory. Columns: a_id, b_id, score.",
        epilog=_EPILOG,
        formatter_class=formatter,
    )
    pairs.add_argument("--a", required=True, metavar="PATH", help=_INPUTS)
    pairs.add_argument("--b", required=True, metavar="PATH", help="as --a, of the same width")
    _common(pairs)
    threshold = kinds.add_parser(
        "threshold",
        help="every (query, corpus row) pair with cosine >= --min-score",
        description="For each query every corpus row with cosine >= --min-score, exact, best first. With --self "
        "(no --queries) the corpus against itself: each unordered pair once, query_id before corpus_id in row "
        "order, never a row with itself. Columns: query_id, corpus_id, score.",
        epilog=_EPILOG,
        formatter_class=formatter,
    )
    threshold.add_argument("--corpus", required=True, metavar="PATH|@NAME", help=f"{_INPUTS}; or @NAME, the --server's shared corpus NAME")
    threshold.add_argument("--queries", metavar="PATH", default=None, help="(N, D) queries, in any corpus layout")
    threshold.add_argument("--self", action="store_true", dest="self_join", help="the corpus against itself (no --queries)")
    threshold.add_argument("--min-score", type=float, required=True, metavar="TAU", help="keep pairs with cosine >= TAU")
    threshold.add_argument(
        "--max-per-query", type=int, default=None, metavar="N", help="keep at most the N best of each query (the summary says how many were cut)"
    )
    threshold.add_argument("--batch-size", type=int, default=256, help="queries per streamed batch [default 256]")
    _common(threshold)


def _summary(ns: argparse.Namespace, summary: jobs.Summary) -> str:
    rate = f"{summary.rows / summary.seconds:,.0f}" if summary.seconds > 0 else "-"
    done = f" ({summary.skipped} parts already written)" if summary.skipped else ""
    if ns.job == "topk":
        return f"cosserve score: {summary.rows} queries, k={ns.k}, {summary.seconds:.2f} s, {rate} queries/s{done} -> {ns.out}"
    if ns.job == "pairs":
        return f"cosserve score pairs: {summary.rows} pairs, {summary.seconds:.2f} s, {rate} pairs/s{summary.note}{done} -> {ns.out}"
    return (
        f"cosserve score threshold: {summary.rows} queries, {summary.results} pairs, {summary.seconds:.2f} s, "
        f"{rate} queries/s{summary.note}{done} -> {ns.out}"
    )


def run(ns: argparse.Namespace) -> int:
    """Run the job; 0 on success, 2 for bad inputs, 1 when a server refuses, 130 on Ctrl-C (the
    parts written stay, sessions are closed)."""
    job = getattr(ns, "job", None) or "topk"
    ns.job = job
    if ns.part_rows is None:
        ns.part_rows = _PART_ROWS[job]
    prefix = "cosserve score" if job == "topk" else f"cosserve score {job}"
    resumable = ns.out.endswith(".parquet")
    summary = jobs.Summary()
    try:
        if getattr(ns, "batch_size", 1) < 1:
            raise UsageError(f"--batch-size must be at least 1, got {ns.batch_size}")
        JOBS[job](ns, summary)
    except (UsageError, DatasetError) as err:
        print(f"{prefix}: {err}", file=sys.stderr)
        return 2
    except CosserveRpcError as err:
        hint = "; rerun with --resume to continue" if resumable else ""
        print(f"{prefix}: {err.code().name}: {err.details()}{hint}", file=sys.stderr)
        return 1
    except CosserveError as err:
        print(f"{prefix}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        hint = f"; rerun with --resume to continue from the {summary.skipped + _written(summary)} parts written" if resumable else ""
        print(f"{prefix}: interrupted{hint}", file=sys.stderr)
        return 130
    print(_summary(ns, summary), file=sys.stderr)
    return 0


def _written(summary: jobs.Summary) -> int:
    return summary.parts
