"""Exact cosine range search: for each query, every corpus row whose cosine is >= min_score, found
in bounded tiles, with a cap per query and a bound on the results held. No gRPC here.

The scores are top-k's (`similarity`'s tiles: the same float32 products of the stored values), and
the test `score >= min_score` is made on them in the compute dtype, with min_score rounded to it:
a row is returned exactly when the score top-k would report for it passes. A float64 reference can
differ only for rows whose cosine lies within float32 rounding (about 1e-6) of min_score.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import pyarrow as pa
import torch

from cosserve import limits
from cosserve.server.compute.numerics import check_query_corpus, compute_dtype
from cosserve.server.compute.similarity import check_dtypes, inverse_norms, score_tiles, tile_plan
from cosserve.server.errors import InvalidArgument, ResourceExhausted
from cosserve.server.memory import is_out_of_memory
from cosserve.server.state.norm_cache import NormCache
from cosserve.server.state.row_ids import RowIds

__all__ = ["HIT_BYTES", "MAX_REPLY_BYTES", "RangeHits", "range_search", "reply_bytes", "score_range"]

# Bytes of one ScoreRange reply at most: a message, less room for its framing.
MAX_REPLY_BYTES = limits.MAX_MESSAGE_BYTES - 256 * 1024

# Bytes charged per hit held while searching: its query row, corpus row and score, and room for
# the copies the final sort makes of them.
HIT_BYTES = 2 * (8 + 8 + 4)
# Below this many hits a block's hits are never compacted to the cap (a sort costs more than it saves).
_MIN_COMPACT = 1 << 16


@dataclasses.dataclass(frozen=True)
class RangeHits:
    """Every query's hits in CSR form (faiss's RangeSearchResult): query i's are rows
    lims[i]:lims[i+1] of `indices` and `scores`, best first, equal scores by the lower index."""

    lims: torch.Tensor  # int64 (N + 1,)
    indices: torch.Tensor  # int64 (R,) corpus rows
    scores: torch.Tensor  # (R,) the corpus dtype
    truncated: torch.Tensor  # bool (N,): the query had more than max_per_query hits

    @property
    def count(self) -> int:
        return int(self.indices.shape[0])


def reply_bytes(queries: int, hits: int, itemsize: int) -> int:
    """Bytes of a range reply's tensors without ids: lims, truncated flags, indices and scores."""
    return 8 * (queries + 1) + queries + hits * (8 + itemsize)


def _ordered(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """The order of hits by (row, -score, column), for hits whose columns rise within each row."""
    order = torch.argsort(vals, descending=True, stable=True)  # equal scores keep column order
    return order[torch.argsort(rows[order], stable=True)]


def _capped(rows: torch.Tensor, n: int, cap: int) -> torch.Tensor:
    """Mask of the first `cap` hits of each row, for hits sorted by row."""
    starts = torch.zeros(n + 1, dtype=torch.int64, device=rows.device)
    starts[1:] = torch.bincount(rows, minlength=n).cumsum(0)
    return torch.arange(rows.shape[0], device=rows.device) - starts[rows] < cap


def range_search(
    queries: torch.Tensor,
    corpus: torch.Tensor,
    min_score: float,
    max_per_query: int = 0,
    inv_norms: torch.Tensor | None = None,
    *,
    max_hits: int,
    charge: Callable[[int], None] = lambda nbytes: None,
) -> RangeHits:
    """For each query row, the corpus rows with cosine >= min_score: all of them, or the best
    `max_per_query` (> 0) by (-score, index). At most `max_hits` hits are kept in all, else
    ResourceExhausted. `charge(nbytes)` is told the bytes held for hits before they are kept (the
    high-water mark; it raises to refuse). Memory is the tiles plus the hits held."""
    n, d = queries.shape
    m = corpus.shape[0]
    ct = compute_dtype(corpus.dtype)
    norms = inverse_norms(corpus) if inv_norms is None else inv_norms
    query_rows, corpus_rows = tile_plan(n, d, corpus.device, ct)
    cap = max_per_query if max_per_query > 0 else None
    threshold = torch.tensor(min_score, dtype=ct).item()  # rounded to the compute dtype, as compared
    counts = torch.zeros(n, dtype=torch.int64, device=corpus.device)
    done: list[tuple[torch.Tensor, torch.Tensor]] = []  # (indices, scores) of finished blocks, ordered
    kept = torch.zeros(n, dtype=torch.int64, device=corpus.device)
    total = 0  # hits of finished blocks
    charged = 0
    held: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    held_count = 0

    def hold(extra: int) -> None:
        nonlocal charged
        if (total + held_count + extra) * HIT_BYTES > charged:
            charged = (total + held_count + extra) * HIT_BYTES
            charge(charged)

    def compact(block: int) -> None:
        nonlocal held, held_count
        rows, cols, vals = (torch.cat(parts) for parts in zip(*held))
        order = _ordered(rows, cols, vals)
        rows, cols, vals = rows[order], cols[order], vals[order]
        if cap is not None:
            keep = _capped(rows, block, cap)
            rows, cols, vals = rows[keep], cols[keep], vals[keep]
        held, held_count = [(rows, cols, vals)], rows.shape[0]

    for qs, cs, tile in score_tiles(queries, corpus, norms, query_rows, corpus_rows):
        block = tile.shape[0]
        rows, cols = (tile >= threshold).nonzero(as_tuple=True)
        found = rows.shape[0]
        if found:
            counts[qs : qs + block] += torch.bincount(rows, minlength=block)
            if cap is None and total + held_count + found > max_hits:
                raise _too_many(n, min_score, max_hits)
            hold(found)
            held.append((rows, cols + cs, tile[rows, cols]))  # indexing copies: the tile's buffer is reused
            held_count += found
            # With a cap, the hits held are cut down to it from time to time: memory stays within
            # about twice the cap's worth, or the reply's bound, whatever the rows that pass.
            if cap is not None and held_count > min(max(_MIN_COMPACT, 2 * block * cap), max_hits - total):
                compact(block)
                if total + held_count > max_hits:
                    raise _too_many(n, min_score, max_hits)
        if cs + tile.shape[1] >= m:  # the block's last tile
            if held:
                compact(block)
                rows, cols, vals = held[0]
                if total + held_count > max_hits:
                    raise _too_many(n, min_score, max_hits)
                kept[qs : qs + block] = torch.bincount(rows, minlength=block)
                done.append((cols, vals.to(corpus.dtype)))
                total += held_count
            held, held_count = [], 0
    lims = torch.zeros(n + 1, dtype=torch.int64, device=corpus.device)
    lims[1:] = kept.cumsum(0)
    indices = torch.cat([i for i, _ in done]) if done else torch.empty(0, dtype=torch.int64, device=corpus.device)
    scores = torch.cat([s for _, s in done]) if done else torch.empty(0, dtype=corpus.dtype, device=corpus.device)
    truncated = counts > cap if cap is not None else torch.zeros(n, dtype=torch.bool, device=corpus.device)
    return RangeHits(lims, indices, scores, truncated)


def _too_many(n: int, min_score: float, max_hits: int) -> ResourceExhausted:
    return ResourceExhausted(
        f"ScoreRange: {n} queries at min_score={min_score:g} match more than the {max_hits} rows one reply may "
        "carry; raise min_score, set max_per_query, or send fewer queries per message"
    )


def score_range(
    corpus_name: str,
    corpus: torch.Tensor,
    queries: torch.Tensor,
    min_score: float,
    max_per_query: int,
    norms: NormCache,
    max_reply_bytes: int,
    charge: Callable[[int], None],
    ids: RowIds | None = None,
) -> tuple[RangeHits, pa.Array | None]:
    """ScoreRange's work for one batch: checks that name the corpus blob and the arguments, then
    range_search with the corpus norms from the cache, its hits (and with `ids`, their ids) within
    one reply of max_reply_bytes, every byte held charged first."""
    what = f"corpus blob {corpus_name!r}"
    try:
        if math.isnan(min_score):
            raise InvalidArgument("min_score is NaN; give a number (cosines lie in [-1, 1])")
        if max_per_query < 0:
            raise InvalidArgument(f"max_per_query must be 0 (no cap) or positive, got {max_per_query}")
        check_dtypes(queries, corpus, what)
        check_query_corpus(queries, corpus, queries_name="queries", corpus_name=what)
    except InvalidArgument as err:
        raise InvalidArgument(f"ScoreRange: {err}") from None
    n = queries.shape[0]
    # int64 ids take 8 bytes a row; string ids are counted once found, below.
    per_hit = 8 + corpus.element_size() + (8 if ids is not None and ids.kind == "int64" else 0)
    room = max_reply_bytes - reply_bytes(n, 0, corpus.element_size())
    if room < 0:
        raise ResourceExhausted(f"ScoreRange: {n} queries are too many for one reply; send fewer queries per message")
    charged = 0

    def charge_total(nbytes: int) -> None:
        nonlocal charged
        charge(nbytes)
        charged = nbytes

    try:
        hits = range_search(
            queries, corpus, min_score, max_per_query, norms.get(corpus, inverse_norms), max_hits=room // per_hit, charge=charge_total
        )
    except Exception as err:
        if is_out_of_memory(err):
            raise ResourceExhausted(f"ScoreRange: out of memory: {err}") from None
        raise
    if ids is None:
        return hits, None
    rows = hits.indices.cpu().numpy()
    nbytes = reply_bytes(n, hits.count, corpus.element_size()) + ids.bytes_of(rows)
    if nbytes > max_reply_bytes:
        raise ResourceExhausted(
            f"ScoreRange: the {hits.count} rows found and their ids take {limits.readable_bytes(nbytes)}, above the "
            f"{limits.readable_bytes(max_reply_bytes)} of one reply; send fewer queries per message, raise min_score or set max_per_query"
        )
    charge(charged + ids.bytes_of(rows))
    return hits, ids.take(rows)
