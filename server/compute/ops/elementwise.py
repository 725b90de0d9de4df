"""Element-wise operators: Cos and its gradient."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from cosserve.server.compute.numerics import check_same_shape
from cosserve.server.compute.registry import InputSpec, OpSchema, register


@register(
    OpSchema(
        name="Cos",
        inputs=(InputSpec("X"),),
        outputs=("Y",),
        doc="Y = cos(X), element-wise; Y has the shape of X.",
        gradient="CosGradient",
    )
)
def cos(inputs: Sequence[torch.Tensor], args: Mapping[str, Any]) -> list[torch.Tensor]:
    # Y = cos(X)
    (x,) = inputs
    return [torch.cos(x)]


@register(
    OpSchema(
        name="CosGradient",
        inputs=(InputSpec("X"), InputSpec("dY")),
        outputs=("dX",),
        doc="dX = -dY * sin(X), element-wise; X and dY have the same shape.",
    ),
    check_shapes=check_same_shape(names=("X", "dY")),
)
def cos_gradient(inputs: Sequence[torch.Tensor], args: Mapping[str, Any]) -> list[torch.Tensor]:
    # dX = -dY * sin(X)
    x, dy = inputs
    return [-dy * torch.sin(x)]
