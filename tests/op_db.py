"""The operator table the op tests are generated from (OpInfo style): one OpEntry per registered op.

Each entry has an independent float64 numpy reference written from OPS_SPEC.md (never calling
cosserve's torch code), sample inputs and error inputs. A forward op with a gradient also gives
its formula in torch, for autograd. Adding an operator = adding one entry to OP_DB.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from cosserve.server.compute.registry import ArgType, InputKind, OpSchema

__all__ = [
    "ALL_DTYPES",
    "ErrorCase",
    "OP_DB",
    "OpEntry",
    "Sample",
    "blob",
    "generic_error_cases",
    "gradient_samples",
    "out_blob",
]

ALL_DTYPES = ("float16", "bfloat16", "float32", "float64")
EPS = 1e-12  # OPS_SPEC: floor of squared norms, L1 gradient dead zone


def blob(input_name: str) -> str:
    """The blob name the tests feed an op's input under (error messages must name it)."""
    return f"blob_{input_name}"


def out_blob(output_name: str) -> str:
    return f"out_{output_name}"


@dataclasses.dataclass(frozen=True)
class Sample:
    """Valid inputs: floating arrays in float64 (the tests cast them), labels as integer arrays."""

    inputs: tuple[np.ndarray, ...]
    args: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    desc: str = ""
    smooth: bool = True  # away from kinks and floors: fit for finite differences and autograd
    dtypes: tuple[str, ...] = ALL_DTYPES  # floating dtypes this sample is checked in
    grad_dtypes: tuple[str, ...] | None = None  # for the gradient op's derived sample; None: dtypes


@dataclasses.dataclass(frozen=True)
class ErrorCase:
    """Inputs (fed as-is, under blob(schema input name)) that must fail with INVALID_ARGUMENT."""

    desc: str
    inputs: tuple[np.ndarray, ...]
    match: tuple[str, ...]  # substrings the status message must contain
    args: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    n_outputs: int | None = None  # None: the schema's output count


@dataclasses.dataclass(frozen=True)
class OpEntry:
    name: str
    ref: Callable[..., tuple[np.ndarray, ...]]  # (*inputs, **args) -> outputs, in float64 numpy
    samples: Callable[[np.random.Generator], list[Sample]]
    errors: Callable[[], list[ErrorCase]] = lambda: []
    # The forward formula in torch, for ops with a gradient: (*tensors, **args) -> first output.
    autograd_ref: Callable[..., torch.Tensor] | None = None
    # (rtol, atol) per dtype where the defaults below do not fit.
    tolerances: Mapping[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    # (got, want, dtype name) -> None, raising on mismatch; replaces the default comparison
    # (floating outputs within tolerance and of the input dtype, other outputs exactly equal).
    compare: Callable[[Sequence[np.ndarray], Sequence[np.ndarray], str], None] | None = None


# Outputs are computed in float32 (float64 for float64) and rounded once, so the reference on the
# same (rounded) inputs is within about one output ulp.
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float16": (1e-3, 1e-4),
    "bfloat16": (1.6e-2, 1e-3),
    "float32": (1.3e-6, 1e-5),
    "float64": (1e-9, 1e-12),
}


# ---- references: numpy, float64, from the spec -------------------------------------------


def rows_np(a: np.ndarray) -> np.ndarray:
    """OPS_SPEC's reading: (N, d1, ..) is N rows of width d1·..; 1-D n rows of width 1; 0-D one row."""
    if a.ndim == 0:
        return a.reshape(1, 1)
    if a.ndim == 1:
        return a.reshape(a.shape[0], 1)
    return a.reshape(a.shape[0], math.prod(a.shape[1:]))


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("nd,nd->n", a, b)


def ref_cos(x: np.ndarray) -> tuple[np.ndarray, ...]:
    return (np.cos(x),)


def ref_cos_gradient(x: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, ...]:
    return (-dy * np.sin(x),)


def _norms(xr: np.ndarray, yr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.sqrt(np.maximum(_dot(xr, xr), EPS)), np.sqrt(np.maximum(_dot(yr, yr), EPS))


def ref_cosine_similarity(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    xr, yr = rows_np(x), rows_np(y)
    xn, yn = _norms(xr, yr)
    return (_dot(xr, yr) / (xn * yn),)


def ref_cosine_similarity_gradient(x: np.ndarray, y: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, ...]:
    xr, yr = rows_np(x), rows_np(y)
    xn, yn = (n[:, None] for n in _norms(xr, yr))
    xy, g = _dot(xr, yr)[:, None], g[:, None]
    dx = g * yr / (xn * yn) - g * xy * xr / (xn**3 * yn)
    dy = g * xr / (xn * yn) - g * xy * yr / (yn**3 * xn)
    return dx.reshape(x.shape), dy.reshape(y.shape)


def ref_dot_product(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    if x.size == 0:
        return (np.zeros(0),)
    return (_dot(rows_np(x), rows_np(y)),)


def ref_dot_product_gradient(x: np.ndarray, y: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, ...]:
    if x.size == 0:
        return np.zeros(x.shape), np.zeros(y.shape)
    return (g[:, None] * rows_np(y)).reshape(x.shape), (g[:, None] * rows_np(x)).reshape(y.shape)


def _widened(x: np.ndarray, y: np.ndarray, pad_value: float, replicate: bool) -> tuple[np.ndarray, np.ndarray]:
    """Both rows at the longer width: the shorter one tiled (replicate) or padded with pad_value."""
    xr, yr = rows_np(x), rows_np(y)
    width = max(xr.shape[1], yr.shape[1])

    def widen(a: np.ndarray) -> np.ndarray:
        if a.shape[1] == width:
            return a
        if replicate:
            return np.tile(a, (1, width // a.shape[1]))
        out = np.full((a.shape[0], width), float(pad_value))
        out[:, : a.shape[1]] = a
        return out

    return widen(xr), widen(yr)


def ref_dot_product_with_padding(
    x: np.ndarray, y: np.ndarray, pad_value: float = 0.0, replicate: bool = False
) -> tuple[np.ndarray, ...]:
    if x.size == 0:  # Caffe2: no rows when X has no elements, whatever Y's width
        return (np.zeros(0),)
    xw, yw = _widened(x, y, pad_value, replicate)
    return (_dot(xw, yw),)


def ref_dot_product_with_padding_gradient(
    x: np.ndarray, y: np.ndarray, g: np.ndarray, pad_value: float = 0.0, replicate: bool = False
) -> tuple[np.ndarray, ...]:
    if x.size == 0:
        return np.zeros(x.shape), np.zeros(y.shape)
    xr, yr = rows_np(x), rows_np(y)
    xw, yw = _widened(x, y, pad_value, replicate)
    g = g[:, None]

    def grad(own: np.ndarray, other_widened: np.ndarray) -> np.ndarray:
        n, d = own.shape
        full = g * other_widened
        if replicate and d < full.shape[1]:  # a tiled row collects the gradient of every copy
            return full.reshape(n, full.shape[1] // d, d).sum(1)
        return full[:, :d]

    return grad(xr, yw).reshape(x.shape), grad(yr, xw).reshape(y.shape)


def ref_squared_l2_distance(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    d = rows_np(x) - rows_np(y)
    return (0.5 * (d**2).sum(1),)


def ref_squared_l2_distance_gradient(x: np.ndarray, y: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, ...]:
    dx = g[:, None] * (rows_np(x) - rows_np(y))
    return dx.reshape(x.shape), (-dx).reshape(y.shape)


def ref_l1_distance(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    return (np.abs(rows_np(x) - rows_np(y)).sum(1),)


def ref_l1_distance_gradient(x: np.ndarray, y: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, ...]:
    d = rows_np(x) - rows_np(y)
    dx = np.where(np.abs(d) <= EPS, 0.0, g[:, None] * np.sign(d))
    return dx.reshape(x.shape), (-dx).reshape(y.shape)


def ref_cosine_embedding_criterion(s: np.ndarray, y: np.ndarray, margin: float = 0.0) -> tuple[np.ndarray, ...]:
    same = y.reshape(s.shape) == 1
    return (np.where(same, 1.0 - s, np.maximum(0.0, s - margin)),)


def ref_cosine_embedding_criterion_gradient(
    s: np.ndarray, y: np.ndarray, g: np.ndarray, margin: float = 0.0
) -> tuple[np.ndarray, ...]:
    same, g = y.reshape(s.shape) == 1, g.reshape(s.shape)
    return (np.where(same, -g, np.where(s >= margin, g, 0.0)),)


def ref_cosine_similarity_matrix(q: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, ...]:
    qn = np.sqrt(np.maximum(np.einsum("nd,nd->n", q, q), EPS))
    cn = np.sqrt(np.maximum(np.einsum("md,md->m", c, c), EPS))
    return ((q @ c.T) / np.outer(qn, cn),)


def ref_cosine_top_k(q: np.ndarray, c: np.ndarray, k: int = 10) -> tuple[np.ndarray, ...]:
    (s,) = ref_cosine_similarity_matrix(q, c)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k].astype(np.int64)  # stable: ties to the lower index
    return np.take_along_axis(s, order, 1), order


# ---- forward formulas in torch, for autograd ---------------------------------------------


def _rows_t(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 0:
        return t.reshape(1, 1)
    if t.dim() == 1:
        return t.reshape(t.shape[0], 1)
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


def torch_cosine_similarity(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    xr, yr = _rows_t(x), _rows_t(y)
    return (xr * yr).sum(1) / torch.sqrt((xr * xr).sum(1).clamp(min=EPS) * (yr * yr).sum(1).clamp(min=EPS))


def torch_dot_product(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if x.numel() == 0:
        return x.reshape(-1)[:0]
    return (_rows_t(x) * _rows_t(y)).sum(1)


def torch_dot_product_with_padding(
    x: torch.Tensor, y: torch.Tensor, pad_value: float = 0.0, replicate: bool = False
) -> torch.Tensor:
    if x.numel() == 0:
        return x.reshape(-1)[:0]
    xr, yr = _rows_t(x), _rows_t(y)
    width = max(xr.shape[1], yr.shape[1])

    def widen(a: torch.Tensor) -> torch.Tensor:
        if a.shape[1] == width:
            return a
        if replicate:
            return a.repeat(1, width // a.shape[1])
        return torch.nn.functional.pad(a, (0, width - a.shape[1]), value=float(pad_value))

    return (widen(xr) * widen(yr)).sum(1)


def torch_squared_l2_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((_rows_t(x) - _rows_t(y)) ** 2).sum(1)


def torch_l1_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (_rows_t(x) - _rows_t(y)).abs().sum(1)


def torch_cosine_embedding_criterion(s: torch.Tensor, y: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    return torch.where(y.reshape(s.shape) == 1, 1 - s, (s - margin).clamp(min=0))


# ---- sample inputs -----------------------------------------------------------------------


def _pair(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    return rng.uniform(-2, 2, shape), rng.uniform(-2, 2, shape)


def _rowwise_samples(rng: np.random.Generator) -> list[Sample]:
    """Shapes every row-wise op (X, Y of equal shape) must handle, random values."""
    shapes = [(4, 3), (), (5,), (2, 3, 2), (1, 7), (3, 0), (0, 4), (2, 0, 3)]
    return [Sample(_pair(rng, s), desc=f"shape {s}") for s in shapes]


def cosine_similarity_samples(rng: np.random.Generator) -> list[Sample]:
    tiny = np.array([[1e-7, 0.0], [0.0, 0.0], [3.0, -4.0]])
    other = np.array([[1.0, 0.0], [1.0, 2.0], [0.0, 0.0]])
    # At the floor, the spec's gradient is ~g/1e-6: beyond float16's range.
    floor = Sample((tiny, other), desc="norm floor, zero rows", smooth=False,
                   grad_dtypes=("bfloat16", "float32", "float64"))
    return [*_rowwise_samples(rng), floor]


def dot_product_samples(rng: np.random.Generator) -> list[Sample]:
    return _rowwise_samples(rng)


def dot_product_with_padding_samples(rng: np.random.Generator) -> list[Sample]:
    def pair(xs: tuple[int, ...], ys: tuple[int, ...], **args: Any) -> Sample:
        return Sample((rng.uniform(-2, 2, xs), rng.uniform(-2, 2, ys)), args, f"X {xs} Y {ys} {args}")

    return [
        pair((3, 5), (3, 2), pad_value=0.5),
        pair((3, 2), (3, 5)),
        pair((2, 3), (2, 3), pad_value=7.0),
        pair((2, 6), (2, 3), replicate=True),
        pair((2, 2), (2, 6), replicate=True, pad_value=3.0),  # pad_value is unused with replicate
        pair((2, 2, 3), (2, 4, 1), pad_value=-1.5),
        pair((2, 3, 2), (2, 1, 3), replicate=True),
        pair((), (), pad_value=2.0),
        pair((4,), (4,), replicate=True),
        pair((3, 0), (3, 4), pad_value=2),  # an integer where a float is expected
        pair((3, 0), (3, 0), replicate=True),
        pair((2, 0), (2, 3), replicate=True),  # no elements in X: (0,), no divisibility to check
        pair((0, 3), (0, 5)),
    ]


def squared_l2_distance_samples(rng: np.random.Generator) -> list[Sample]:
    return _rowwise_samples(rng)


def l1_distance_samples(rng: np.random.Generator) -> list[Sample]:
    x = np.array([[0.0, 1e-13, 1e-12, 2e-12, 0.5], [1.0, -1.0, 0.25, 0.25, 3.0]])
    y = np.array([[0.0, 0.0, 0.0, 0.0, 0.25], [1.0, 1.0, 0.25, 0.5, -3.0]])
    return [*_rowwise_samples(rng), Sample((x, y), desc="dead zone", smooth=False)]


def cosine_embedding_criterion_samples(rng: np.random.Generator) -> list[Sample]:
    def labels(shape: tuple[int, ...], dtype: type) -> np.ndarray:
        return rng.choice(np.array([-1, 0, 1, 1, 2], dtype=dtype), size=shape)

    def smooth_s(shape: tuple[int, ...], margin: float) -> np.ndarray:
        s = rng.uniform(-1, 1, shape)
        return np.where(np.abs(s - margin) < 0.05, s + 0.1, s)  # away from the kink

    kink = np.array([0.25, 0.25, 0.125, 0.5, -1.0])
    return [
        Sample((smooth_s((6,), 0.0), labels((6,), np.int32)), desc="int32 labels"),
        Sample((smooth_s((2, 3), 0.25), labels((2, 3), np.int64)), {"margin": 0.25}, "int64 labels"),
        Sample((smooth_s((2, 2), -0.5), labels((4,), np.int32)), {"margin": -0.5}, "S (2,2) with Y (4,)"),
        Sample((smooth_s((), 0.0), np.array(1, np.int64)), {"margin": 0}, "0-D, integer margin"),
        Sample((np.zeros((0, 3)), np.zeros(0, np.int32)), desc="empty"),
        Sample((kink, np.array([0, 1, 0, 7, -1], np.int32)), {"margin": 0.25}, "at the margin", smooth=False),
    ]


def cos_samples(rng: np.random.Generator) -> list[Sample]:
    return [Sample((rng.uniform(-4, 4, s),), desc=f"shape {s}") for s in [(3, 4), (), (0, 2), (7,)]]


def cosine_similarity_matrix_samples(rng: np.random.Generator) -> list[Sample]:
    floor_q = np.array([[1e-7, 0.0], [0.0, 0.0], [3.0, -4.0]])
    floor_c = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [-1.0, 1.0]])
    return [
        Sample((rng.uniform(-2, 2, (4, 6)), rng.uniform(-2, 2, (7, 6))), desc="Q (4, 6) C (7, 6)"),
        Sample((rng.uniform(-2, 2, (1, 5)), rng.uniform(-2, 2, (1, 5))), desc="one row each"),
        Sample((floor_q, floor_c), desc="norm floor, zero rows", smooth=False),
        Sample((np.zeros((0, 3)), rng.uniform(-2, 2, (4, 3))), desc="no queries"),
        Sample((rng.uniform(-2, 2, (2, 3)), np.zeros((0, 3))), desc="empty corpus"),
        Sample((np.zeros((3, 0)), np.zeros((2, 0))), desc="width 0"),
    ]


def cosine_top_k_samples(rng: np.random.Generator) -> list[Sample]:
    # Small integers: scores are exact in every dtype, so equal scores tie exactly.
    patterns = np.array([[1, 1, 1, 1], [2, 0, 0, 0], [0, 0, 0, 0], [1, -1, 1, -1], [0, 2, 0, 0]], np.float64)
    ties_c = patterns[[0, 1, 2, 3, 4, 1, 0, 2, 4, 3, 1, 0]]
    ties_q = np.array([[1.0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0], [1, 1, 1, 1]])
    return [
        Sample((rng.uniform(-2, 2, (5, 8)), rng.uniform(-2, 2, (20, 8))), {"k": 4}, "Q (5, 8) C (20, 8) k 4"),
        Sample((rng.uniform(-2, 2, (3, 4)), rng.uniform(-2, 2, (6, 4))), {"k": 6}, "k = M"),
        Sample((rng.uniform(-2, 2, (2, 3)), rng.uniform(-2, 2, (12, 3))), {}, "default k 10"),
        Sample((ties_q, ties_c), {"k": 7}, "ties go to the lower index", smooth=False),
        Sample((np.array([[0.0, 0.0], [1.0, 0.0]]), np.array([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0], [2.0, 0.0]])),
               {"k": 3}, "norm floor, zero rows", smooth=False),
        Sample((np.zeros((0, 4)), rng.uniform(-2, 2, (3, 4))), {"k": 2}, "no queries"),
    ]


def gradient_samples(
    forward_ref: Callable[..., tuple[np.ndarray, ...]], forward_samples: Callable[[np.random.Generator], list[Sample]]
) -> Callable[[np.random.Generator], list[Sample]]:
    """A gradient op's samples: its forward op's inputs followed by a random dOutput."""

    def samples(rng: np.random.Generator) -> list[Sample]:
        derived = []
        for sample in forward_samples(rng):
            out = forward_ref(*sample.inputs, **sample.args)[0]
            g = rng.standard_normal(out.shape)
            dtypes = sample.dtypes if sample.grad_dtypes is None else sample.grad_dtypes
            derived.append(dataclasses.replace(sample, inputs=(*sample.inputs, g), dtypes=dtypes, grad_dtypes=None))
        return derived

    return samples


# ---- error inputs ------------------------------------------------------------------------

F = np.float32


def _same_shape_errors(op: str) -> Callable[[], list[ErrorCase]]:
    def errors() -> list[ErrorCase]:
        return [
            ErrorCase("Y shape", (np.zeros((2, 3), F), np.zeros((2, 4), F)), (op, "Y", blob("Y"), "(2, 3)", "(2, 4)")),
            ErrorCase("Y rank", (np.zeros((2, 3), F), np.zeros((2, 3, 1), F)), (op, "Y", blob("Y"), "(2, 3, 1)")),
            ErrorCase("no broadcast", (np.zeros((2, 3), F), np.zeros((1, 3), F)), (op, blob("Y"), "(1, 3)")),
        ]

    return errors


def _same_shape_gradient_errors(op: str, g: str) -> Callable[[], list[ErrorCase]]:
    def errors() -> list[ErrorCase]:
        x = np.zeros((2, 3), F)
        return [
            ErrorCase("Y shape", (x, np.zeros((3, 2), F), np.zeros(2, F)), (op, blob("Y"), "(3, 2)")),
            ErrorCase(f"{g} length", (x, x, np.zeros(3, F)), (op, g, blob(g), "length 2", "(3,)")),
            ErrorCase(f"{g} 2-D", (x, x, np.zeros((2, 1), F)), (op, g, blob(g), "1-D", "(2, 1)")),
            ErrorCase(f"{g} 0-D", (x, x, np.zeros((), F)), (op, g, blob(g), "1-D")),
        ]

    return errors


def dot_product_gradient_errors() -> list[ErrorCase]:
    op = "DotProductGradient"
    empty = np.zeros((3, 0), F)
    return [
        *_same_shape_gradient_errors(op, "dP")(),
        ErrorCase("zero-size X needs dP (0,)", (empty, empty, np.zeros(3, F)), (op, blob("dP"), "length 0")),
    ]


def _padding_errors(op: str, gradient: bool) -> Callable[[], list[ErrorCase]]:
    def errors() -> list[ErrorCase]:
        def case(desc: str, xs: tuple[int, ...], ys: tuple[int, ...], match: tuple[str, ...], **args: Any) -> ErrorCase:
            n = 1 if len(xs) == 0 else xs[0]
            g = (np.zeros(n, F),) if gradient else ()
            return ErrorCase(desc, (np.zeros(xs, F), np.zeros(ys, F), *g), (op, *match), args)

        cases = [
            case("rows", (2, 3), (3, 3), (blob("Y"), "(3, 3)")),
            case("rank", (2, 3), (2, 3, 1), (blob("Y"), "(2, 3, 1)")),
            case("replicate 4 vs 3", (2, 4), (2, 3), (blob("Y"), "replicate", "divide"), replicate=True),
            case("replicate 3 vs 0", (2, 3), (2, 0), (blob("Y"), "replicate", "divide"), replicate=True),
        ]
        if gradient:
            x = np.zeros((2, 3), F)
            bad = (x, np.zeros((2, 5), F), np.zeros(3, F))
            cases.append(ErrorCase("dP length", bad, (op, "dP", blob("dP"), "length 2")))
        return cases

    return errors


def _criterion_errors(gradient: bool) -> Callable[[], list[ErrorCase]]:
    op = "CosineEmbeddingCriterionGradient" if gradient else "CosineEmbeddingCriterion"

    def errors() -> list[ErrorCase]:
        s, y = np.zeros((2, 2), F), np.zeros(4, np.int32)
        g = (np.zeros(4, F),) if gradient else ()
        cases = [
            ErrorCase("Y count", (s, np.zeros(5, np.int32), *g), (op, "Y", blob("Y"), "4 elements", "(5,)")),
            ErrorCase("float labels", (s, np.zeros(4, F), *g), (op, "Y", blob("Y"), "int32 or int64", "float32")),
            ErrorCase("margin string", (s, y, *g), (op, "margin", "float"), {"margin": "0.5"}),
        ]
        if gradient:
            cases.append(ErrorCase("dLoss count", (s, y, np.zeros(3, F)), (op, "dLoss", blob("dLoss"), "(3,)")))
        return cases

    return errors


def cos_gradient_errors() -> list[ErrorCase]:
    return [ErrorCase("dY shape", (np.zeros(3, F), np.zeros(4, F)), ("CosGradient", "dY", "(4,)"))]


def cosine_similarity_matrix_errors() -> list[ErrorCase]:
    op = "CosineSimilarityMatrix"
    return [
        ErrorCase("widths", (np.zeros((2, 3), F), np.zeros((4, 5), F)), (op, "width 3", "width 5", blob("C"))),
        ErrorCase("Q 1-D", (np.zeros(3, F), np.zeros((4, 3), F)), (op, "Q", "2-D", blob("Q"), "(3,)")),
        ErrorCase("C 3-D", (np.zeros((2, 3), F), np.zeros((4, 3, 1), F)), (op, "C", "2-D", blob("C"), "(4, 3, 1)")),
    ]


def cosine_top_k_errors() -> list[ErrorCase]:
    op = "CosineTopK"
    q, c = np.zeros((2, 3), F), np.zeros((4, 3), F)
    return [
        ErrorCase("widths", (q, np.zeros((4, 5), F)), (op, "width 3", "width 5", blob("C")), {"k": 2}),
        ErrorCase("k 0", (q, c), (op, "k must be between 1 and the 4", "got 0"), {"k": 0}),
        ErrorCase("k > M", (q, c), (op, "k must be between 1 and the 4", "got 5"), {"k": 5}),
        ErrorCase("default k > M", (q, c), (op, "got 10", blob("C"))),
        ErrorCase("Q 3-D", (np.zeros((2, 3, 1), F), c), (op, "2-D", blob("Q")), {"k": 2}),
    ]


def generic_error_cases(entry: OpEntry, schema: OpSchema) -> list[ErrorCase]:
    """Errors every op has, read off its schema: dtypes, mixed float dtypes, counts, arguments."""
    base = entry.samples(np.random.default_rng(0))[0]
    kinds = [spec.kind for spec in schema.inputs]
    names = [spec.name for spec in schema.inputs]
    inputs = tuple(a.astype(np.float64) if k is InputKind.FLOAT else a for a, k in zip(base.inputs, kinds))
    op, args = entry.name, dict(base.args)
    cases = []
    for i, (kind, name) in enumerate(zip(kinds, names)):
        wrong, got = (np.int32, "int32") if kind is InputKind.FLOAT else (np.float32, "float32")
        bad = (*inputs[:i], inputs[i].astype(wrong), *inputs[i + 1 :])
        cases.append(ErrorCase(f"{name} {got}", bad, (op, name, blob(name), got), args))
    floats = [i for i, k in enumerate(kinds) if k is InputKind.FLOAT]
    if len(floats) > 1:
        i = floats[1]
        mixed = (*inputs[:i], inputs[i].astype(np.float32), *inputs[i + 1 :])
        cases.append(ErrorCase("mixed float dtypes", mixed, (op, blob(names[i]), "share a dtype"), args))
    cases.append(ErrorCase("too few inputs", inputs[:-1], (op, "input", ", ".join(names)), args))
    cases.append(ErrorCase("too many inputs", (*inputs, inputs[0]), (op, "input", blob("extra0")), args))
    cases.append(ErrorCase("too many outputs", inputs, (op, "output"), args, n_outputs=len(schema.outputs) + 1))
    cases.append(ErrorCase("unknown argument", inputs, (op, "bogus_arg"), {**args, "bogus_arg": 1.0}))
    # A bool may be the int 0 or 1 (Caffe2 stores bools so); any other int is wrong.
    wrong_values = {ArgType.FLOAT: "1.0", ArgType.INT: 1.5, ArgType.BOOL: 2, ArgType.STRING: 1}
    for spec in schema.args:
        bad_args = {**args, spec.name: wrong_values[spec.type]}
        cases.append(ErrorCase(f"{spec.name} type", inputs, (op, spec.name, spec.type.value), bad_args))
    return cases


# ---- the table ---------------------------------------------------------------------------

OP_DB: dict[str, OpEntry] = {
    e.name: e
    for e in [
        OpEntry("Cos", ref_cos, cos_samples, autograd_ref=torch.cos),
        OpEntry("CosGradient", ref_cos_gradient, gradient_samples(ref_cos, cos_samples), cos_gradient_errors),
        OpEntry(
            "CosineSimilarity",
            ref_cosine_similarity,
            cosine_similarity_samples,
            _same_shape_errors("CosineSimilarity"),
            torch_cosine_similarity,
        ),
        OpEntry(
            "CosineSimilarityGradient",
            ref_cosine_similarity_gradient,
            gradient_samples(ref_cosine_similarity, cosine_similarity_samples),
            _same_shape_gradient_errors("CosineSimilarityGradient", "dS"),
        ),
        OpEntry(
            "DotProduct", ref_dot_product, dot_product_samples, _same_shape_errors("DotProduct"), torch_dot_product
        ),
        OpEntry(
            "DotProductGradient",
            ref_dot_product_gradient,
            gradient_samples(ref_dot_product, dot_product_samples),
            dot_product_gradient_errors,
        ),
        OpEntry(
            "DotProductWithPadding",
            ref_dot_product_with_padding,
            dot_product_with_padding_samples,
            _padding_errors("DotProductWithPadding", gradient=False),
            torch_dot_product_with_padding,
        ),
        OpEntry(
            "DotProductWithPaddingGradient",
            ref_dot_product_with_padding_gradient,
            gradient_samples(ref_dot_product_with_padding, dot_product_with_padding_samples),
            _padding_errors("DotProductWithPaddingGradient", gradient=True),
        ),
        OpEntry(
            "SquaredL2Distance",
            ref_squared_l2_distance,
            squared_l2_distance_samples,
            _same_shape_errors("SquaredL2Distance"),
            torch_squared_l2_distance,
        ),
        OpEntry(
            "SquaredL2DistanceGradient",
            ref_squared_l2_distance_gradient,
            gradient_samples(ref_squared_l2_distance, squared_l2_distance_samples),
            _same_shape_gradient_errors("SquaredL2DistanceGradient", "dL"),
        ),
        OpEntry(
            "L1Distance", ref_l1_distance, l1_distance_samples, _same_shape_errors("L1Distance"), torch_l1_distance
        ),
        OpEntry(
            "L1DistanceGradient",
            ref_l1_distance_gradient,
            gradient_samples(ref_l1_distance, l1_distance_samples),
            _same_shape_gradient_errors("L1DistanceGradient", "dL"),
        ),
        OpEntry(
            "CosineEmbeddingCriterion",
            ref_cosine_embedding_criterion,
            cosine_embedding_criterion_samples,
            _criterion_errors(gradient=False),
            torch_cosine_embedding_criterion,
        ),
        OpEntry(
            "CosineEmbeddingCriterionGradient",
            ref_cosine_embedding_criterion_gradient,
            gradient_samples(ref_cosine_embedding_criterion, cosine_embedding_criterion_samples),
            _criterion_errors(gradient=True),
        ),
        OpEntry(
            "CosineSimilarityMatrix",
            ref_cosine_similarity_matrix,
            cosine_similarity_matrix_samples,
            cosine_similarity_matrix_errors,
        ),
        OpEntry("CosineTopK", ref_cosine_top_k, cosine_top_k_samples, cosine_top_k_errors),
    ]
}
