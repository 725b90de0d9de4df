"""Row-wise operators on pairs of tensors: cosine similarity, dot products, L2 and L1 distances."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from cosserve.server.compute.numerics import (
    NORM_FLOOR,
    check_gradient_input,
    check_same_shape,
    from_rows,
    row_count,
    row_width,
    rows,
    shape_of,
)
from cosserve.server.compute.registry import ArgSpec, ArgType, InputSpec, OpSchema, ShapeCheck, register
from cosserve.server.errors import InvalidArgument

# ---- CosineSimilarity --------------------------------------------------------------------


def _norm(sq: torch.Tensor) -> torch.Tensor:
    # Caffe2 floors the squared norm (not the norm) at 1e-12, so a zero row gives 0, never NaN.
    return torch.sqrt(sq.clamp(min=NORM_FLOOR))


@register(
    OpSchema(
        name="CosineSimilarity",
        inputs=(InputSpec("X"), InputSpec("Y")),
        outputs=("S",),
        doc="S = x·y / sqrt(max(x·x, 1e-12) · max(y·y, 1e-12)) per row; X and Y of equal shape; S is (N,).",
        gradient="CosineSimilarityGradient",
    ),
    check_shapes=check_same_shape(),
)
def cosine_similarity(inputs: Sequence[torch.Tensor], args: Mapping[str, Any]) -> list[torch.Tensor]:
    # S = x·y / (max(x·x, eps)^½ · max(y·y, eps)^½)
    x, y = rows(inputs[0]), rows(inputs[1])
    s = (x * y).sum(1) / (_norm((x * x).sum(1)) * _norm((y * y).sum(1)))
    return [s.to(inputs[0].dtype)]


@register(
    OpSchema(
        name="CosineSimilarityGradient",
        inputs=(InputSpec("X"), InputSpec("Y"), InputSpec("dS")),
        outputs=("dX", "dY"),
        doc="dX = g·y/(xn·yn) − g·(x·y)·x/(xn³·yn), dY symmetric, with xn = sqrt(max(x·x, 1e-12)); "
        "dS is (N,).",
    ),
    check_shapes=check_same_shape(gradient_input="dS"),
)
def cosine_similarity_gradient(inputs: Sequence[torch.Tensor], args: Mapping[str, Any]) -> list[torch.Tensor]:
    # dX = g·y/(xn·yn) − g·(x·y)·x/(xn³·yn); dY = g·x/(xn·yn) − g·(x·y)·y/(yn³·xn)
    x_in, y_in, g_in = inputs
    x, y = rows(x_in), rows(y_in)
    g = g_in.to(x.dtype)[:, None]
    xn = _norm((x * x).sum(1))[:, None]
    yn = _norm((y * y).sum(1))[:, None]
    xy = (x * y).sum(1)[:, None]
    dx = g * y / (xn * yn) - g * xy * x / (xn**3 * yn)
    dy = g * x / (xn * yn) - g * xy * y / (yn**3 * xn)
    return [from_rows(dx, x_in), from_rows(dy, y_in)]


# ---- DotProduct --------------------------------------------------------------------------


def _dot_rows(t: torch.Tensor) -> int:
    # Caffe2: any zero-size input gives shape (0,), even (N, 0).
    return 0 if t.numel() == 0 else row_count(t)


@register(
    OpSchema(
        name="DotProduct",
        inputs=(InputSpec("X"), InputSpec("Y")),
        outputs=("P",),
        doc="P = x·y per row; X and Y of equal shape; P is (N,), and (0,) for any zero-size input.",
        gradient="DotProductGradient",
    ),
    check_shapes=check_same_shape(),
)
def dot_product(inputs: Sequence[torch.Tensor], args: Mapping[str, Any]) -> list[torch.Tensor]:
    # P = x·y
    x_in, y_in = inputs
    if x_in.numel() == 0:
        return [x_in.new_zeros(0)]
    return [(rows(x_in) * rows(y_in)).sum(1).to(x_in.dtype)]


@register(
    OpSchema(
        name="DotProductGradient",
        inputs=(InputSpec("X"), InputSpec("Y"), InputSpec("dP")),
        outputs=("dX", "dY"),
        doc="dX = g·y, dY = g·x per row; dP is (N,), and (0,) for zero-size X.",
    ),
    check_shapes=check_same_shape(gradient_input="dP", n_rows=_dot_rows),
)
def dot_product_gradient(inputs: Sequence[torch.Tensor], args: Mapping[str, Any]) -> list[torch.Tensor]:
    # dX = g·y, dY = g·x
    x_in, y_in, g_in = inputs
    if x_in.numel() == 0:
        return [torch.zeros_like(x_in), torch.zeros_like(y_in)]
    x, y = rows(x_in), rows(y_in)
    g = g_in.to(x.dtype)[:, None]
    return [from_rows(g * y, x_in), from_rows(g * x, y_in)]


# ---- DotProductWithPadding ---------------------------------------------------------------

_PADDING_ARGS = (
    ArgSpec("pad_value", ArgType.FLOAT, 0.0, "value the shorter row is padded with (unless replicate)"),
    ArgSpec("replicate", ArgType.BOOL, False, "tile the shorter row over the longer one instead of padding"),
)


def _check_padding(gradient_input: str | None = None) -> ShapeCheck:
    """X and Y with the same rank and rows; widths may differ (dividing each other for replicate).
    An X with no elements has no rows to pad (Caffe2: N = 0), whatever Y's width."""

    def check(inputs: Sequence[torch.Tensor], args: Mapping[str, Any]) -> None:
        x, y = inputs[0], inputs[1]
        if x.dim() != y.dim() or row_count(x) != row_count(y):
            raise InvalidArgument(
                f"input Y must have the rank and first dimension of X {shape_of(x)}, got {shape_of(y)}"
            )
        short, long = sorted((row_width(x), row_width(y)))
        if x.numel() and args["replicate"] and short != long and (short == 0 or long % short):
            raise InvalidArgument(
                f"with replicate, one row width must divide the other; X {shape_of(x)} has width "
                f"{row_width(x)}, Y {shape_of(y)} has width {row_width(y)}"
            )
        if gradient_input is not None:
            check_gradient_input(gradient_input, inputs[2], _dot_rows(x), x)

    return check


def _longer_first(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(longer, shorter, whether X is the longer) of two (N, D) matrices."""
    return (x, y, True) if x.shape[1] > y.shape[1] else (y, x, False)


@register(
    OpSchema(
        name="DotProductWithPadding",
        inputs=(InputSpec("X"), InputSpec("Y")),
        outputs=("P",),
        args=_PADDING_ARGS,
        doc="P = x·y per row, the shorter row padded with pad_value (or, with replicate, tiled over the "
        "longer one); X and Y have the same rows, widths may differ; P is (N,), and (0,) when X has no "
        "elements.",
        gradient="DotProductWithPaddingGradient",
    ),
    check_shapes=_check_padding(),
)
def dot_product_with_padding(inputs: Sequence[torch.Tensor], args: Mapping[str, Any]) -> list[torch.Tensor]:
    # P = Σ_j long[j]·short[j mod DS] (replicate), else Σ_{j<DS} x[j]·y[j] + pad_value·Σ_{j≥DS} long[j]
    if inputs[0].numel() == 0:  # Caffe2: N = 0 when X has no elements, even (3, 0) against (3, 4)
        return [inputs[0].new_zeros(0)]
    x, y = rows(inputs[0]), rows(inputs[1])
    n = x.shape[0]
    long, short, _ = _longer_first(x, y)
    ds, dl = short.shape[1], long.shape[1]
    if args["replicate"] and ds != dl:
        p = (long.reshape(n, dl // ds, ds) * short[:, None, :]).sum((1, 2))
    else:
        p = (long[:, :ds] * short).sum(1)
        if dl > ds:
            p = p + args["pad_value"] * long[:, ds:].sum(1)
    return [p.to(inputs[0].dtype)]


@register(
    OpSchema(
        name="DotProductWithPaddingGradient",
        inputs=(InputSpec("X"), InputSpec("Y"), InputSpec("dP")),
        outputs=("dX", "dY"),
        args=_PADDING_ARGS,
        doc="Gradient of DotProductWithPadding: g times the other (padded or tiled) row; the padded "
        "tail of the longer row gets g·pad_value; dP is (N,), and (0,) when X has no elements (dX, dY "
        "are then zeros).",
    ),
    check_shapes=_check_padding(gradient_input="dP"),
)
def dot_product_with_padding_gradient(inputs: Sequence[torch.Tensor], args: Mapping[str, Any]) -> list[torch.Tensor]:
    # replicate: dlong[j] = g·short[j mod DS], dshort = g·Σ_k long[k·DS:(k+1)·DS];
    # padding: dlong = g·[short, pad_value, ...], dshort = g·long[:DS]
    x_in, y_in, g_in = inputs
    if x_in.numel() == 0:  # the forward had no rows (Caffe2's N = 0): nothing flows back
        return [torch.zeros_like(x_in), torch.zeros_like(y_in)]
    x, y = rows(x_in), rows(y_in)
    n = x.shape[0]
    g = g_in.to(x.dtype)[:, None]
    long, short, x_is_long = _longer_first(x, y)
    ds, dl = short.shape[1], long.shape[1]
    if args["replicate"] and ds != dl:
        k = dl // ds
        d_long = (g[:, :, None] * short[:, None, :]).expand(n, k, ds).reshape(n, dl)
        d_short = g * long.reshape(n, k, ds).sum(1)
    else:
        d_long = torch.cat([g * short, (g * args["pad_value"]).expand(n, dl - ds)], dim=1)
        d_short = g * long[:, :ds]
    dx, dy = (d_long, d_short) if x_is_long else (d_short, d_long)
    return [from_rows(dx, x_in), from_rows(dy, y_in)]


# ---- SquaredL2Distance -------------------------------------------------------------------


@register(
    OpSchema(
        name="SquaredL2Distance",
        inputs=(InputSpec("X"), InputSpec("Y")),
        outputs=("L",),
        doc="L = ½ Σ (x − y)² per row (computed from the difference); X and Y of equal shape; L is (N,).",
        gradient="SquaredL2DistanceGradient",
    ),
    check_shapes=check_same_shape(),
)
def squared_l2_distance(inputs: Sequence[torch.Tensor], args: Mapping[str, Any]) -> list[torch.Tensor]:
    # L = ½ Σ (x − y)²; Caffe2's ½(x·x + y·y) − x·y cancels catastrophically for close rows.
    d = rows(inputs[0]) - rows(inputs[1])
    return [(0.5 * (d * d).sum(1)).to(inputs[0].dtype)]


@register(
    OpSchema(
        name="SquaredL2DistanceGradient",
        inputs=(InputSpec("X"), InputSpec("Y"), InputSpec("dL")),
        outputs=("dX", "dY"),
        doc="dX = g·(x − y), dY = −dX per row; dL is (N,).",
    ),
    check_shapes=check_same_shape(gradient_input="dL"),
)
def squared_l2_distance_gradient(inputs: Sequence[torch.Tensor], args: Mapping[str, Any]) -> list[torch.Tensor]:
    # dX = g·(x − y), dY = −dX
    x_in, y_in, g_in = inputs
    x, y = rows(x_in), rows(y_in)
    dx = g_in.to(x.dtype)[:, None] * (x - y)
    return [from_rows(dx, x_in), from_rows(-dx, y_in)]


# ---- L1Distance --------------------------------------------------------------------------


@register(
    OpSchema(
        name="L1Distance",
        inputs=(InputSpec("X"), InputSpec("Y")),
        outputs=("L",),
        doc="L = Σ abs(x − y) per row; X and Y of equal shape; L is (N,).",
        gradient="L1DistanceGradient",
    ),
    check_shapes=check_same_shape(),
)
def l1_distance(inputs: Sequence[torch.Tensor], args: Mapping[str, Any]) -> list[torch.Tensor]:
    # L = Σ |x − y|
    return [(rows(inputs[0]) - rows(inputs[1])).abs().sum(1).to(inputs[0].dtype)]


@register(
    OpSchema(
        name="L1DistanceGradient",
        inputs=(InputSpec("X"), InputSpec("Y"), InputSpec("dL")),
        outputs=("dX", "dY"),
        doc="dX = g·sign(x − y), 0 where abs(x − y) ≤ 1e-12; dY = −dX; dL is (N,).",
    ),
    check_shapes=check_same_shape(gradient_input="dL"),
)
def l1_distance_gradient(inputs: Sequence[torch.Tensor], args: Mapping[str, Any]) -> list[torch.Tensor]:
    # dX = g·sign(x − y)·[|x − y| > eps], dY = −dX (Caffe2's dead zone around x == y, kEps wide)
    x_in, y_in, g_in = inputs
    d = rows(x_in) - rows(y_in)
    live = d.abs() > NORM_FLOOR
    slope = g_in.to(d.dtype)[:, None] * torch.sign(d)
    # dY is masked on its own, not negated from dX: Caffe2 writes 0 to both in the dead zone,
    # and −dX would make it −0.0 there.
    dx = torch.where(live, slope, 0.0)
    dy = torch.where(live, -slope, 0.0)
    return [from_rows(dx, x_in), from_rows(dy, y_in)]
