"""Exact (brute-force) cosine scoring of queries against a corpus, in bounded tiles. No gRPC here."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from cosserve.limits import readable_bytes
from cosserve.server.compute.numerics import NORM_FLOOR, check_query_corpus, compute_dtype
from cosserve.server.errors import InvalidArgument, ResourceExhausted
from cosserve.server.memory import FLOAT_DTYPES, dtype_name, is_out_of_memory
from cosserve.server.state.norm_cache import NormCache

__all__ = [
    "CORPUS_CHUNK_BYTES",
    "CPU_BLOCK_BYTES",
    "CUDA_BLOCK_BYTES",
    "check_dtypes",
    "inverse_norms",
    "score_blob",
    "similarity_matrix",
    "to_device",
    "top_k",
]


# Bound of one (query block x corpus chunk) tile of scores. On CPU a tile that stays in cache
# while topk reads it back is fastest (256 queries x 2048 rows measured as fast as x 4096 on a
# 2-core EPYC, with less memory held); on CUDA larger tiles keep the device busy and mean fewer
# host syncs.
CPU_BLOCK_BYTES = 2 * 1024**2
CUDA_BLOCK_BYTES = 64 * 1024**2
# Bound of one corpus chunk converted to the compute dtype (float16/bfloat16 corpora).
CORPUS_CHUNK_BYTES = 8 * 1024**2
# Rows of one step of the norm computation. Small: glibc keeps freed blocks of up to 32 MiB for
# reuse, so larger temporaries would stay in the server's resident memory after the first corpus.
NORM_CHUNK_BYTES = 1024**2
# Queries scored together; rows are independent, so larger N only adds blocks.
QUERY_BLOCK_ROWS = 1024
# Per-chunk candidates are merged into the running top-k once this many k-widths pile up.
MERGE_EVERY = 16


def check_dtypes(queries: torch.Tensor, corpus: torch.Tensor, corpus_name: str) -> None:
    """InvalidArgument unless the corpus is floating and the queries share its dtype."""
    if corpus.dtype not in FLOAT_DTYPES:
        raise InvalidArgument(
            f"{corpus_name} is {dtype_name(corpus.dtype)}; it must be "
            f"{' or '.join(dtype_name(d) for d in FLOAT_DTYPES)}"
        )
    if queries.dtype != corpus.dtype:
        raise InvalidArgument(
            f"queries are {dtype_name(queries.dtype)} but {corpus_name} is {dtype_name(corpus.dtype)}; "
            "send queries in the corpus dtype"
        )


def inverse_norms(x: torch.Tensor) -> torch.Tensor:
    """1 / sqrt(max(x·x, 1e-12)) per row of an (M, D) tensor, in the compute dtype, chunk by chunk."""
    ct = compute_dtype(x.dtype)
    out = torch.empty(x.shape[0], dtype=ct, device=x.device)
    rows = max(1, NORM_CHUNK_BYTES // max(1, x.shape[1] * ct.itemsize))
    for start in range(0, x.shape[0], rows):
        part = x[start : start + rows].to(ct)
        # sqrt, then reciprocal: the CosineSimilarity formula, not an approximate rsqrt
        out[start : start + rows] = torch.linalg.vecdot(part, part).clamp_min_(NORM_FLOOR).sqrt_().reciprocal_()
    return out


def _plan(n: int, d: int, device: torch.device, ct: torch.dtype) -> tuple[int, int]:
    """(query rows, corpus rows) of one tile, so the tile and a converted chunk stay bounded."""
    block = CUDA_BLOCK_BYTES if device.type == "cuda" else CPU_BLOCK_BYTES
    query_rows = max(1, min(n, QUERY_BLOCK_ROWS))
    corpus_rows = min(block // (query_rows * ct.itemsize), CORPUS_CHUNK_BYTES // max(1, d * ct.itemsize))
    return query_rows, max(1, corpus_rows)


def _normalized(queries: torch.Tensor, ct: torch.dtype) -> torch.Tensor:
    return queries.to(ct) * inverse_norms(queries).unsqueeze(1)


# oneDNN's float32 inner product (what torch's inductor calls for linear layers on CPU); on AMD
# CPUs it runs 2-3x faster than the MKL sgemm behind torch.matmul, at the same float32 accuracy.
_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
USE_ONEDNN = True


def _onednn_usable(device: torch.device, ct: torch.dtype, d: int) -> bool:
    return (
        USE_ONEDNN
        and _ONEDNN_LINEAR is not None
        and device.type == "cpu"
        and ct == torch.float32
        and d > 0
        and torch.backends.mkldnn.is_available()
    )


def _shaped(buffer: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous (rows, cols) view of the start of a buffer holding at least rows * cols."""
    return buffer.view(-1)[: rows * cols].view(rows, cols)


def _tiles(
    queries: torch.Tensor, corpus: torch.Tensor, inv_norms: torch.Tensor, query_rows: int, corpus_rows: int
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(query start, corpus start, tile of scores) for every tile, query blocks outermost.

    On the matmul path every tile is written into one buffer, overwritten by the next tile: a
    fresh block per tile would leave the allocator's freed blocks resident, growing the server's
    memory for nothing. oneDNN's inner product returns a new tile each time (small: 2 MiB).
    """
    ct = compute_dtype(corpus.dtype)
    m, d = corpus.shape
    onednn = _onednn_usable(corpus.device, ct, d) and _ONEDNN_LINEAR is not None
    tiles = None if onednn else torch.empty(
        min(query_rows, queries.shape[0]) * min(corpus_rows, m), dtype=ct, device=corpus.device
    )
    converted = None if corpus.dtype == ct else torch.empty(min(corpus_rows, m) * d, dtype=ct, device=corpus.device)
    for qs in range(0, queries.shape[0], query_rows):
        qn = _normalized(queries[qs : qs + query_rows], ct)
        for cs in range(0, m, corpus_rows):
            chunk = corpus[cs : cs + corpus_rows]
            if converted is not None:
                chunk = _shaped(converted, chunk.shape[0], d).copy_(chunk)
            # S = (q / |q|) · c * (1 / |c|): the corpus is never copied normalized, only its norms are kept
            if tiles is None and _ONEDNN_LINEAR is not None:
                tile = _ONEDNN_LINEAR(qn, chunk, None, "none", [], "")
            else:
                assert tiles is not None
                tile = torch.matmul(qn, chunk.T, out=_shaped(tiles, qn.shape[0], chunk.shape[0]))
            tile.mul_(inv_norms[cs : cs + corpus_rows])
            yield qs, cs, tile


def similarity_matrix(
    queries: torch.Tensor, corpus: torch.Tensor, inv_norms: torch.Tensor | None = None
) -> torch.Tensor:
    """S[i, j] = q_i·c_j / sqrt(max(q_i·q_i, 1e-12) · max(c_j·c_j, 1e-12)), shape (N, M), input dtype."""
    n, d = queries.shape
    m = corpus.shape[0]
    ct = compute_dtype(corpus.dtype)
    norms = inverse_norms(corpus) if inv_norms is None else inv_norms
    try:
        out = torch.empty((n, m), dtype=corpus.dtype, device=corpus.device)
    except Exception as err:
        if not is_out_of_memory(err):
            raise
        raise ResourceExhausted(
            f"CosineSimilarityMatrix: the ({n}, {m}) output does not fit in memory; CosineTopK keeps only "
            f"the best k per query ({err.__class__.__name__})"
        ) from None
    query_rows, corpus_rows = _plan(n, d, corpus.device, ct)
    for qs, cs, tile in _tiles(queries, corpus, norms, query_rows, corpus_rows):
        out[qs : qs + tile.shape[0], cs : cs + tile.shape[1]] = tile
    return out


def _lexsorted(values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row ordered by (-score, index); indices are distinct within a row."""
    indices, order = indices.sort(dim=1)
    values = values.gather(1, order)
    values, order = values.sort(dim=1, descending=True, stable=True)  # equal scores keep index order
    return values, indices.gather(1, order)


def _best_k(values: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best candidates per row, ordered by (-score, index)."""
    if values.shape[1] > k + 1:
        # A float sort of every candidate is slow on CPU; topk narrows them to k + 1 first, and
        # rows where that cut falls inside a tie are sorted whole.
        top_values, columns = values.topk(k + 1, dim=1)
        top_indices = indices.gather(1, columns)
        tied = top_values[:, k - 1] == top_values[:, k]
        if bool(tied.any()):
            rows = tied.nonzero().squeeze(1)
            exact_values, exact_indices = _lexsorted(values[rows], indices[rows])
            top_values[rows] = exact_values[:, : k + 1]
            top_indices[rows] = exact_indices[:, : k + 1]
        values, indices = top_values, top_indices
    values, indices = _lexsorted(values, indices)
    return values[:, :k], indices[:, :k]


def _tile_candidates(tile: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates of one tile (values, column) that surely hold its best k by (-score, index)."""
    n, width = tile.shape
    if width <= k + 1:  # on the matmul path the tile's buffer is reused for the next tile: keep a copy
        return tile.clone(), torch.arange(width, device=tile.device).expand(n, width)
    values, columns = tile.topk(k + 1, dim=1)
    # topk orders equal values arbitrarily, so when the k-th and (k+1)-th best are equal it may
    # have kept a higher index of the tie; such rows are redone with a stable sort (lower first).
    tied = values[:, k - 1] == values[:, k]
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        exact_values, exact_columns = tile[rows].sort(dim=1, descending=True, stable=True)
        values[rows] = exact_values[:, : k + 1]
        columns[rows] = exact_columns[:, : k + 1]
    return values, columns


def top_k(
    queries: torch.Tensor, corpus: torch.Tensor, k: int, inv_norms: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine top-k of each query row: scores (N, k) in the input dtype and int64 corpus rows (N, k),
    best first, ties broken by lower index. Memory is bounded by tiles whatever M is."""
    n, d = queries.shape
    ct = compute_dtype(corpus.dtype)
    norms = inverse_norms(corpus) if inv_norms is None else inv_norms
    scores = torch.empty((n, k), dtype=corpus.dtype, device=corpus.device)
    indices = torch.empty((n, k), dtype=torch.int64, device=corpus.device)
    query_rows, corpus_rows = _plan(n, d, corpus.device, ct)
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []
    width = 0
    for qs, cs, tile in _tiles(queries, corpus, norms, query_rows, corpus_rows):
        if cs == 0:
            pending, width = [], 0
        values, columns = _tile_candidates(tile, k)
        pending.append((values, columns + cs))
        width += values.shape[1]
        last = cs + tile.shape[1] >= corpus.shape[0]
        if last or width >= MERGE_EVERY * (k + 1):
            best = _best_k(torch.cat([v for v, _ in pending], 1), torch.cat([i for _, i in pending], 1), k)
            pending, width = [best], best[0].shape[1]
        if last:
            rows = slice(qs, qs + tile.shape[0])
            scores[rows] = pending[0][0]
            indices[rows] = pending[0][1]
    return scores, indices


def score_blob(
    corpus_name: str,
    corpus: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    norms: NormCache,
    max_result_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ScoreTopK's work for one batch: checks that name the corpus blob, then top_k with the
    corpus norms from the session's cache. The result must fit in max_result_bytes (one message)."""
    what = f"corpus blob {corpus_name!r}"
    try:
        check_dtypes(queries, corpus, what)
        check_query_corpus(queries, corpus, k, queries_name="queries", corpus_name=what)
    except InvalidArgument as err:
        raise InvalidArgument(f"ScoreTopK: {err}") from None
    row_bytes = k * (corpus.element_size() + 8)
    result_bytes = queries.shape[0] * row_bytes
    if result_bytes > max_result_bytes:
        rows = max_result_bytes // row_bytes
        # The advice must be one the caller can follow: fewer rows only helps while one row fits.
        advice = (
            f"send fewer queries per message: at most {rows} with this k"
            if rows
            else "one query's reply alone is too large: run the CosineTopK operator (RunOperator) and fetch its "
            "outputs with FetchBlobStream, as cosserve's Client.top_k does for such a k"
        )
        raise ResourceExhausted(
            f"ScoreTopK: {queries.shape[0]} queries with k={k} give a reply of {readable_bytes(result_bytes)}, above the "
            f"{readable_bytes(max_result_bytes)} a ScoreTopK reply may carry; {advice}"
        )
    try:
        return top_k(queries, corpus, k, norms.get(corpus, inverse_norms))
    except Exception as err:
        if is_out_of_memory(err):
            raise ResourceExhausted(f"ScoreTopK: out of memory: {err}") from None
        raise


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a host tensor to `device`. To CUDA it goes through pinned memory without blocking, so a
    reader thread can stage the next batch while the device still scores the previous one (the copy
    is queued on the same stream as the scoring kernels, which therefore see it complete)."""
    if device.type != "cuda":
        return tensor.to(device)
    pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    pinned.copy_(tensor)
    return pinned.to(device, non_blocking=True)
