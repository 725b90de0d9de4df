"""Numerics shared by the operators and scoring: compute dtype, norm floor, row views, shape checks."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from cosserve.server.compute.registry import ShapeCheck
from cosserve.server.errors import InvalidArgument

__all__ = [
    "NORM_FLOOR",
    "check_gradient_input",
    "check_query_corpus",
    "check_same_shape",
    "compute_dtype",
    "from_rows",
    "row_count",
    "row_width",
    "rows",
    "shape_of",
]

# Caffe2's kEps: the floor of each *squared* norm (a zero row has similarity 0, never NaN), and
# the dead zone of the L1 gradient around x == y.
NORM_FLOOR = 1e-12


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float16, bfloat16 and float32 are computed in float32."""
    # float16 sums of squares overflow past 65504 and both half types lose the low bits of long
    # sums, so half inputs are computed in float32 and only the result is rounded back.
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_count(t: torch.Tensor) -> int:
    return 1 if t.dim() == 0 else t.shape[0]


def row_width(t: torch.Tensor) -> int:
    return 1 if t.dim() <= 1 else math.prod(t.shape[1:])


def rows(t: torch.Tensor) -> torch.Tensor:
    """`t` as an (N, D) matrix in its compute dtype: (N, d1, d2, ...) is N rows of width d1·d2·...,
    a 1-D tensor of length n is n rows of width 1, a 0-D tensor is one row of width 1."""
    return t.reshape(row_count(t), row_width(t)).to(compute_dtype(t.dtype))


def from_rows(m: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """An (N, D) result of rows(like) back in the shape and dtype of `like`."""
    return m.reshape(like.shape).to(like.dtype)


def shape_of(t: torch.Tensor) -> tuple[int, ...]:
    """The shape as a plain tuple, as messages show it: (2, 3), not torch.Size([2, 3])."""
    return tuple(t.shape)


# ---- shape checks ------------------------------------------------------------------------
# Messages leave out the op's name: engine.check_inputs puts it in front (and the blob names
# after), so it is written once; similarity.check_batch puts "ScoreTopK: " in front.


def check_gradient_input(name: str, g: torch.Tensor, n: int, x: torch.Tensor) -> None:
    """InvalidArgument unless the incoming gradient `g` is 1-D of length n (one per row of X)."""
    if g.dim() != 1 or g.shape[0] != n:
        raise InvalidArgument(
            f"input {name} must be 1-D of length {n} (one per row of X {shape_of(x)}), got shape {shape_of(g)}"
        )


def check_same_shape(
    gradient_input: str | None = None,
    n_rows: Callable[[torch.Tensor], int] = row_count,
    names: tuple[str, str] = ("X", "Y"),
) -> ShapeCheck:
    """The first two inputs of equal shape; for a row-wise gradient op, the third input
    (`gradient_input`) 1-D of length n_rows(X)."""

    def check(inputs: Sequence[torch.Tensor], args: Mapping[str, Any]) -> None:
        x, y = inputs[0], inputs[1]
        if x.shape != y.shape:
            raise InvalidArgument(
                f"input {names[1]} must have the shape of {names[0]} {shape_of(x)}, got {shape_of(y)}"
            )
        if gradient_input is not None:
            check_gradient_input(gradient_input, inputs[2], n_rows(x), x)

    return check


def check_query_corpus(
    queries: torch.Tensor,
    corpus: torch.Tensor,
    k: int | None = None,
    *,
    queries_name: str = "Q",
    corpus_name: str = "C",
) -> None:
    """InvalidArgument unless queries are (N, D), the corpus (M, D) and (given k) 1 <= k <= M."""
    for name, tensor, letters in ((queries_name, queries, "(N, D)"), (corpus_name, corpus, "(M, D)")):
        if tensor.dim() != 2:
            raise InvalidArgument(f"{name} must be 2-D {letters}, got shape {shape_of(tensor)}")
    if queries.shape[1] != corpus.shape[1]:
        raise InvalidArgument(
            f"{queries_name} rows have width {queries.shape[1]} but {corpus_name} rows have width "
            f"{corpus.shape[1]}; widths must match"
        )
    if k is not None and not 1 <= k <= corpus.shape[0]:
        raise InvalidArgument(f"k must be between 1 and the {corpus.shape[0]} rows of {corpus_name}, got {k}")
