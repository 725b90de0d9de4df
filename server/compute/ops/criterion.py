"""CosineEmbeddingCriterion: a hinge loss on similarities and integer labels, element-wise."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from cosserve.server.compute.numerics import compute_dtype, shape_of
from cosserve.server.compute.registry import ArgSpec, ArgType, InputKind, InputSpec, OpSchema, ShapeCheck, register
from cosserve.server.errors import InvalidArgument

_MARGIN = ArgSpec("margin", ArgType.FLOAT, 0.0, "similarity below which a non-matching pair costs nothing")


def _check_counts(names: tuple[str, ...]) -> ShapeCheck:
    """Only element counts must match (Caffe2): S (2, 2) with Y (4,) is fine."""

    def check(inputs: Sequence[torch.Tensor], args: Mapping[str, Any]) -> None:
        s = inputs[0]
        for name, t in zip(names[1:], inputs[1:]):
            if t.numel() != s.numel():
                raise InvalidArgument(
                    f"input {name} must have the {s.numel()} elements of S {shape_of(s)}, "
                    f"got {t.numel()} (shape {shape_of(t)})"
                )

    return check


@register(
    OpSchema(
        name="CosineEmbeddingCriterion",
        inputs=(InputSpec("S", doc="similarities"), InputSpec("Y", InputKind.LABEL, "labels; 1 marks a matching pair")),
        outputs=("loss",),
        args=(_MARGIN,),
        doc="loss = 1 − s where y == 1, else max(0, s − margin), element-wise; S and Y of equal element "
        "count; loss has S's shape.",
        gradient="CosineEmbeddingCriterionGradient",
    ),
    check_shapes=_check_counts(("S", "Y")),
)
def cosine_embedding_criterion(inputs: Sequence[torch.Tensor], args: Mapping[str, Any]) -> list[torch.Tensor]:
    # loss = 1 − s if y == 1 else max(0, s − margin); any label other than exactly 1 is "different"
    s_in, y_in = inputs
    s = s_in.to(compute_dtype(s_in.dtype))
    match = y_in.reshape(s.shape) == 1
    hinge = s - args["margin"]
    # Caffe2's std::max(0.f, h) is (0 < h) ? h : 0, so a NaN h gives 0 (clamp would keep the NaN).
    loss = torch.where(match, 1 - s, torch.where(hinge > 0, hinge, 0.0))
    return [loss.to(s_in.dtype)]


@register(
    OpSchema(
        name="CosineEmbeddingCriterionGradient",
        inputs=(
            InputSpec("S", doc="similarities"),
            InputSpec("Y", InputKind.LABEL, "labels; 1 marks a matching pair"),
            InputSpec("dLoss"),
        ),
        outputs=("dS",),
        args=(_MARGIN,),
        doc="dS = −g where y == 1, else g·[s ≥ margin] (≥: at s == margin the gradient is g); S, Y and "
        "dLoss of equal element count; dS has S's shape.",
    ),
    check_shapes=_check_counts(("S", "Y", "dLoss")),
)
def cosine_embedding_criterion_gradient(inputs: Sequence[torch.Tensor], args: Mapping[str, Any]) -> list[torch.Tensor]:
    # dS = −g if y == 1 else g·[s ≥ margin]; Caffe2 uses ≥, so the kink itself passes g through
    s_in, y_in, g_in = inputs
    s = s_in.to(compute_dtype(s_in.dtype))
    g = g_in.reshape(s.shape).to(s.dtype)
    match = y_in.reshape(s.shape) == 1
    ds = torch.where(match, -g, torch.where(s >= args["margin"], g, 0.0))
    return [ds.to(s_in.dtype)]
