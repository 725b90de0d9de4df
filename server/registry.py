"""The operator registry: one frozen schema and one torch implementation per operator."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "ArgSpec",
    "ArgType",
    "InputKind",
    "InputSpec",
    "OpSchema",
    "Operator",
    "OutputBytes",
    "REGISTRY",
    "register",
]


class ArgType(enum.Enum):
    """Type of an operator argument; a float argument also accepts an integer."""

    FLOAT = "float"
    INT = "int"
    BOOL = "bool"
    STRING = "string"


class InputKind(enum.Enum):
    """Which dtypes an input accepts."""

    FLOAT = "float"  # float16, bfloat16, float32 or float64; all FLOAT inputs of one op share it
    LABEL = "label"  # int32 or int64


@dataclasses.dataclass(frozen=True)
class ArgSpec:
    name: str
    type: ArgType
    default: Any
    doc: str


@dataclasses.dataclass(frozen=True)
class InputSpec:
    name: str
    kind: InputKind = InputKind.FLOAT
    doc: str = ""


@dataclasses.dataclass(frozen=True)
class OpSchema:
    """What a client may rely on for one operator: read by validation, ListOperators and docs."""

    name: str
    inputs: tuple[InputSpec, ...]
    outputs: tuple[str, ...]
    args: tuple[ArgSpec, ...] = ()
    doc: str = ""
    gradient: str | None = None  # name of the gradient operator, if any
    caffe2: bool = True  # False for cosserve's extensions beyond Caffe2

    def arg(self, name: str) -> ArgSpec | None:
        return next((a for a in self.args if a.name == name), None)


# An implementation takes the input tensors (already validated) and the resolved
# arguments (defaults filled in, floats as float) and returns the output tensors.
Impl = Callable[[Sequence[torch.Tensor], Mapping[str, Any]], Sequence[torch.Tensor]]
# A checker raises InvalidArgument for inputs whose dtypes are fine but whose shapes do not fit.
ShapeCheck = Callable[[Sequence[torch.Tensor], Mapping[str, Any]], None]
# Bytes an op's outputs will take, for ops whose outputs can be much larger than their inputs:
# checked against the room left before anything is computed.
OutputBytes = Callable[[Sequence[torch.Tensor], Mapping[str, Any]], int]


@dataclasses.dataclass(frozen=True)
class Operator:
    schema: OpSchema
    impl: Impl
    check_shapes: ShapeCheck
    output_bytes: OutputBytes | None = None


REGISTRY: dict[str, Operator] = {}


def _no_shape_check(inputs: Sequence[torch.Tensor], args: Mapping[str, Any]) -> None:
    del inputs, args


def register(
    schema: OpSchema, check_shapes: ShapeCheck = _no_shape_check, output_bytes: OutputBytes | None = None
) -> Callable[[Impl], Impl]:
    """Add `schema` with the decorated implementation to REGISTRY; a name registers once."""

    def add(impl: Impl) -> Impl:
        if schema.name in REGISTRY:
            raise ValueError(f"operator {schema.name!r} is registered twice")
        REGISTRY[schema.name] = Operator(schema, impl, check_shapes, output_bytes)
        return impl

    return add
