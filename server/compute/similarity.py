"""Exact (brute-force) cosine scoring of queries against a corpus, in bounded tiles. No gRPC here."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from cosserve.limits import readable_bytes
from cosserve.server.compute.numerics import NORM_FLOOR, check_query_corpus, compute_dtype
from cosserve.server.errors import InvalidArgument, ResourceExhausted
from cosserve.server.memory import FLOAT_DTYPES, dtype_name, is_out_of_memory

__all__ = [
    "CORPUS_CHUNK_BYTES",
    "CPU_BLOCK_BYTES",
    "CUDA_BLOCK_BYTES",
    "check_batch",
    "check_dtypes",
    "inverse_norms",
    "normalized",
    "score_tiles",
    "shares_passes",
    "similarity_matrix",
    "tile_plan",
    "to_device",
    "top_k",
    "top_k_pass",
]


# Bound of one (tallest query block x corpus chunk) tile of scores, which also sets the corpus
# rows of a chunk: 4096 rows of 384 on CPU (6 MiB, in a shared L3), read once per pass while
# every query tile scores them. On a 2-core EPYC, one query ran 15 % faster at 4096 rows a chunk
# than at 2048 (fewer calls per pass), 256 queries within noise. On CUDA larger tiles keep the
# device busy and mean fewer host syncs.
CPU_BLOCK_BYTES = 4 * 1024**2
CUDA_BLOCK_BYTES = 64 * 1024**2
# Bound of one corpus chunk converted to the compute dtype (float16/bfloat16 corpora).
CORPUS_CHUNK_BYTES = 8 * 1024**2
# Rows of one step of the norm computation. Small: glibc keeps freed blocks of up to 32 MiB for
# reuse, so larger temporaries would stay in the server's resident memory after the first corpus.
NORM_CHUNK_BYTES = 1024**2
# Query rows of the tallest tile. A pass lays its queries in tiles of this height, the last one
# padded with zero rows to the next power of two from MIN_TILE_ROWS (one query alone: 2 rows; one
# row would take a gemv kernel, whose sums run in another order). In the memory-bound regime the
# padding costs little. Each corpus chunk is read once per pass and scored by every tile while
# it is in cache.
QUERY_BLOCK_ROWS = 256
MIN_TILE_ROWS = 2
# Per-chunk candidates are merged into the running top-k once this many k-widths pile up (for a
# k of more than 1 / SETTLE_RATIO of a chunk; a smaller k merges after two chunks and then skips
# every chunk that has no score above a row's k-th best).
MERGE_EVERY = 16
SETTLE_RATIO = 8


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


def tile_plan(n: int, d: int, device: torch.device, ct: torch.dtype) -> tuple[int, int]:
    """(query rows, corpus rows) of one tile, so the tile and a converted chunk stay bounded: the
    blocks and chunks of a top-k pass, so that every score is the one top-k sees."""
    return max(1, min(n, QUERY_BLOCK_ROWS)), _chunk_rows(d, device, ct)


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


def _gemm(queries: torch.Tensor, chunk: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """queries · chunkᵀ, (h, D) x (w, D) -> (h, w), by the one kernel this device and dtype use."""
    if _ONEDNN_LINEAR is not None and _onednn_usable(chunk.device, chunk.dtype, chunk.shape[1]):
        return _ONEDNN_LINEAR(queries, chunk, None, "none", [], "")
    if out is None:
        return torch.matmul(queries, chunk.T)
    return torch.matmul(queries, chunk.T, out=_shaped(out, queries.shape[0], chunk.shape[0]))


def _shaped(buffer: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous (rows, cols) view of the start of a buffer holding at least rows * cols."""
    return buffer.view(-1)[: rows * cols].view(rows, cols)


def score_tiles(
    queries: torch.Tensor, corpus: torch.Tensor, inv_norms: torch.Tensor, query_rows: int, corpus_rows: int
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(query start, corpus start, tile of scores) for every tile, query blocks outermost. The
    queries are normalized together and each block is padded to a tile height of a pass, as
    top_k_pass does for one part, so a score here is bit for bit the one top-k reports.

    On the matmul path every tile is written into one buffer, overwritten by the next tile: a
    fresh block per tile would leave the allocator's freed blocks resident, growing the server's
    memory for nothing. oneDNN's inner product returns a new tile each time (small: 4 MiB).
    """
    ct = compute_dtype(corpus.dtype)
    m, d = corpus.shape
    heights = _heights()
    tiles = torch.empty(max(heights) * min(corpus_rows, m), dtype=ct, device=corpus.device)
    converted = None if corpus.dtype == ct else torch.empty(min(corpus_rows, m) * d, dtype=ct, device=corpus.device)
    everything = _normalized(queries, ct)
    for qs in range(0, queries.shape[0], query_rows):
        rows = min(query_rows, queries.shape[0] - qs)
        height = next((h for h in heights if h >= rows), rows)
        qn = everything[qs : qs + rows]
        if height > rows:
            qn = torch.cat([qn, torch.zeros((height - rows, d), dtype=ct, device=corpus.device)])
        for cs in range(0, m, corpus_rows):
            chunk = corpus[cs : cs + corpus_rows]
            if converted is not None:
                chunk = _shaped(converted, chunk.shape[0], d).copy_(chunk)
            # S = (q / |q|) · c * (1 / |c|): the corpus is never copied normalized, only its norms are kept
            tile = _gemm(qn, chunk, tiles)[:rows]
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
    query_rows, corpus_rows = tile_plan(n, d, corpus.device, ct)
    for qs, cs, tile in score_tiles(queries, corpus, norms, query_rows, corpus_rows):
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


def _chunk_rows(d: int, device: torch.device, ct: torch.dtype) -> int:
    """Corpus rows of one chunk: a tile of the tallest query block and the chunk stay bounded.
    The same for every pass over a corpus, whatever its queries, so a query's GEMM shapes are too."""
    block = CUDA_BLOCK_BYTES if device.type == "cuda" else CPU_BLOCK_BYTES
    rows = min(block // (QUERY_BLOCK_ROWS * ct.itemsize), CORPUS_CHUNK_BYTES // max(1, d * ct.itemsize))
    return max(1, rows)


def _heights() -> list[int]:
    """The query tile heights a pass may use: powers of two from MIN_TILE_ROWS to QUERY_BLOCK_ROWS."""
    tallest = max(1, QUERY_BLOCK_ROWS)
    heights, h = [], min(MIN_TILE_ROWS, tallest)
    while h < tallest:
        heights.append(h)
        h *= 2
    return heights + [tallest]


# (device, dtype, D, chunk widths, kernel, heights, threads) -> whether each row of a tile comes
# out the same, bit for bit, at every tile height and position (see _rows_independent). Bounded:
# corpora of many shapes forget the oldest answers (checked again if they come back).
_INDEPENDENT: dict[tuple[object, ...], bool] = {}
_INDEPENDENT_SHAPES = 1024


def _widths(m: int, d: int, device: torch.device, ct: torch.dtype) -> tuple[int, ...]:
    """The widths of the chunks of an (m, d) corpus: whole chunks, and the last one."""
    rows = _chunk_rows(d, device, ct)
    return tuple(sorted({min(rows, m), m % rows or min(rows, m)}))


def _rows_independent(
    device: torch.device, ct: torch.dtype, d: int, widths: tuple[int, ...], check: bool = True
) -> bool | None:
    """Whether this device's GEMM, called as a pass calls it, gives a query row the same scores
    whatever the tile height and the row's place in the tile. A BLAS picks its kernel and blocking
    from the shapes alone, never from the values, so one check per shape on random data answers
    for every query: each row of a tallest tile is scored again in every smaller height, at every
    place. Where it fails (MKL's float64 at some shapes, cuBLAS heuristics), rows are not mixed."""
    heights = _heights()
    key = (str(device), ct, d, widths, USE_ONEDNN, tuple(heights), torch.get_num_threads())
    known = _INDEPENDENT.get(key)
    if known is not None or not check:
        return known
    generator = torch.Generator().manual_seed(0)
    tallest = heights[-1]
    queries = torch.randn(tallest, d, generator=generator, dtype=ct).to(device)
    corpus = torch.randn(max(widths), d, generator=generator, dtype=ct).to(device)
    buffer = torch.empty(tallest * max(widths), dtype=ct, device=device)
    same = True
    for width in widths:
        chunk = corpus[:width]
        whole = _gemm(queries, chunk, buffer).clone()
        for h in heights[:-1]:
            for start in range(0, tallest, h):
                same = same and torch.equal(_gemm(queries[start : start + h], chunk, buffer), whole[start : start + h])
    while len(_INDEPENDENT) >= _INDEPENDENT_SHAPES:
        del _INDEPENDENT[next(iter(_INDEPENDENT))]
    _INDEPENDENT[key] = same
    return same


def shares_passes(corpus: torch.Tensor, check: bool = True) -> bool | None:
    """Whether top_k_pass scores the queries of several parts (so also a part's rows in several
    passes) in shared tiles for this corpus; where not, it scores each part by itself, whole.
    With check=False, None where the answer is not known yet (the check takes a few GEMMs)."""
    m, d = corpus.shape
    ct = compute_dtype(corpus.dtype)
    if m == 0:
        return False
    widths = _widths(m, d, corpus.device, ct)
    try:
        return _rows_independent(corpus.device, ct, d, widths, check)
    except Exception as err:  # noqa: BLE001  (out of memory for the check: then never mix rows)
        if not is_out_of_memory(err):
            raise
        return False


class _Block:
    """One tile of query rows (padded with zero rows to its height) and the best candidates found
    so far for each real row: by (-score, index), `k` of them once settled."""

    def __init__(self, queries: torch.Tensor, rows: int, k: int, chunk_rows: int) -> None:
        self.queries = queries
        self.rows = rows
        self.k = k
        # A small k settles after two chunks, then most chunks are skipped by the threshold; a
        # large one piles candidates up and merges them seldom (a merge costs O(k) per row).
        self.merge_width = (k + 1) * (2 if (k + 1) * SETTLE_RATIO <= chunk_rows else MERGE_EVERY)
        self.best: tuple[torch.Tensor, torch.Tensor] | None = None  # (values, indices), merged
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.width = 0

    def add(self, tile: torch.Tensor, start: int, last: bool) -> None:
        """Take the scores of one corpus chunk (rows of `tile` beyond `rows` are padding)."""
        tile = tile[: self.rows]
        k = self.k
        if self.best is not None and self.best[0].shape[1] == k and not self.pending:
            # Settled: only a score above a row's k-th best can enter (an equal one has a higher
            # index and loses the tie), and after the first chunks few rows see one.
            best_values, best_indices = self.best
            hit = (tile.amax(dim=1) > best_values[:, k - 1]).nonzero().squeeze(1)
            if hit.numel():
                values, columns = _tile_candidates(tile[hit], k)
                merged = _best_k(
                    torch.cat([best_values[hit], values], 1), torch.cat([best_indices[hit], columns + start], 1), k
                )
                best_values[hit], best_indices[hit] = merged
            return
        values, columns = _tile_candidates(tile, k)
        self.pending.append((values, columns + start))
        self.width += values.shape[1]
        if last or self.width >= self.merge_width:
            if self.best is not None:
                self.pending.insert(0, self.best)
            self.best = _best_k(torch.cat([v for v, _ in self.pending], 1), torch.cat([i for _, i in self.pending], 1), k)
            self.pending, self.width = [], 0


def normalized(queries: torch.Tensor, ct: torch.dtype | None = None) -> torch.Tensor:
    """Query rows divided by their norms (floored as the formula says), in the compute dtype."""
    return _normalized(queries, compute_dtype(queries.dtype) if ct is None else ct)


def top_k_pass(
    corpus: torch.Tensor, inv_norms: torch.Tensor, parts: Sequence[tuple[torch.Tensor, int]]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One pass over `corpus` for several requests: each part is (query rows already `normalized`,
    k), and gets back (scores (n, k) in the corpus dtype, int64 indices (n, k)), best first, ties
    to the lower index. A part's result is the same, bit for bit, whatever other parts share the
    pass: where the GEMM gives a row the same scores at every tile height and place
    (_rows_independent, checked once per shape) rows of all parts share tiles, and otherwise
    each part is scored by itself; candidates are selected by (-score, index), an order with
    one answer."""
    if len(parts) > 1 and not shares_passes(corpus):
        return [_pass(corpus, inv_norms, [part])[0] for part in parts]
    return _pass(corpus, inv_norms, parts)


def _pass(
    corpus: torch.Tensor, inv_norms: torch.Tensor, parts: Sequence[tuple[torch.Tensor, int]]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    m, d = corpus.shape
    ct = compute_dtype(corpus.dtype)
    device = corpus.device
    chunk_rows = _chunk_rows(d, device, ct)
    heights = _heights()
    tallest = heights[-1]
    # Parts in order of k, largest first, so a block's k (its rows' largest) fits most of its rows.
    order = sorted(range(len(parts)), key=lambda i: -parts[i][1])
    offsets, total = {}, 0
    for i in order:
        offsets[i] = total
        total += parts[i][0].shape[0]
    stacked = torch.cat([parts[i][0] for i in order]) if parts else torch.empty((0, d), dtype=ct, device=device)
    blocks: list[_Block] = []
    for start in range(0, total, tallest):
        rows = min(tallest, total - start)
        height = next(h for h in heights if h >= rows)
        queries = torch.zeros((height, d), dtype=ct, device=device)
        queries[:rows] = stacked[start : start + rows]
        k = max(parts[i][1] for i in order if offsets[i] < start + rows and offsets[i] + parts[i][0].shape[0] > start)
        blocks.append(_Block(queries, rows, k, chunk_rows))
    converted = None if corpus.dtype == ct else torch.empty(min(chunk_rows, m) * d, dtype=ct, device=device)
    tiles = torch.empty(tallest * min(chunk_rows, m), dtype=ct, device=device)
    for cs in range(0, m, chunk_rows):
        chunk = corpus[cs : cs + chunk_rows]
        if converted is not None:  # float16/bfloat16: one chunk at a time, never the whole corpus
            chunk = _shaped(converted, chunk.shape[0], d).copy_(chunk)
        norms = inv_norms[cs : cs + chunk_rows]
        last = cs + chunk_rows >= m
        for block in blocks:
            # S = (q / |q|) · c * (1 / |c|): the corpus is never copied normalized, only its norms are kept
            tile = _gemm(block.queries, chunk, tiles)
            tile.mul_(norms)
            block.add(tile, cs, last)
    results = [
        (torch.empty((p.shape[0], k), dtype=corpus.dtype, device=device), torch.empty((p.shape[0], k), dtype=torch.int64, device=device))
        for p, k in parts
    ]
    for b, block in enumerate(blocks):
        assert block.best is not None
        values, indices = block.best
        start = b * tallest
        for i in order:
            first, end = max(start, offsets[i]), min(start + block.rows, offsets[i] + parts[i][0].shape[0])
            if first < end:
                k = parts[i][1]
                results[i][0][first - offsets[i] : end - offsets[i]] = values[first - start : end - start, :k]
                results[i][1][first - offsets[i] : end - offsets[i]] = indices[first - start : end - start, :k]
    return results


def top_k(
    queries: torch.Tensor, corpus: torch.Tensor, k: int, inv_norms: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine top-k of each query row: scores (N, k) in the input dtype and int64 corpus rows (N, k),
    best first, ties broken by lower index. Memory is bounded by tiles whatever M is. The same as
    a pass (top_k_pass) that scores these queries with others."""
    norms = inverse_norms(corpus) if inv_norms is None else inv_norms
    return top_k_pass(corpus, norms, [(normalized(queries, compute_dtype(corpus.dtype)), k)])[0]


def check_batch(corpus_name: str, corpus: torch.Tensor, queries: torch.Tensor, k: int, max_result_bytes: int) -> None:
    """ScoreTopK's checks of one batch, before it is charged or queued: they name the corpus blob,
    and the result must fit in max_result_bytes (one message)."""
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


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a host tensor to `device`. To CUDA it goes through pinned memory without blocking, so a
    reader thread can stage the next batch while the device still scores the previous one (the copy
    is queued on the same stream as the scoring kernels, which therefore see it complete)."""
    if device.type != "cuda":
        return tensor.to(device)
    pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    pinned.copy_(tensor)
    return pinned.to(device, non_blocking=True)
