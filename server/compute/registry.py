"""The operator registry: one frozen schema and one torch implementation per operator."""

from __future__ import annotations

import dataclasses
import difflib
import enum
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from cosserve.server.errors import InvalidArgument, quoted

__all__ = [
    "ArgSpec",
    "ArgType",
    "InputKind",
    "InputSpec",
    "OpSchema",
    "Operator",
    "OutputBytes",
    "REGISTRY",
    "lookup",
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


def lookup(op_type: str) -> Operator:
    """The operator named `op_type`; InvalidArgument naming the closest known names otherwise.
    Every door that takes an op type by name (RunOperator, RunNet, Compute, CheckGradient and the
    other protocols' doors) looks it up here, so each gets the same "did you mean"."""
    op = REGISTRY.get(op_type)
    if op is None:
        raise InvalidArgument(f"unknown operator type {quoted(op_type)}{_suggestion(op_type)}")
    return op


def _folded(name: str) -> str:
    # "cosine_similarity", "COSINESIMILARITY" and "Cosine-Similarity" all mean CosineSimilarity.
    return "".join(c for c in name.lower() if c.isalnum())


# Names longer than this get no suggestion: difflib's cost grows with the product of the lengths,
# and no operator's name is near this long.
_SUGGEST_MAX_CHARS = 64


def _suggestion(op_type: str) -> str:
    if len(op_type) > _SUGGEST_MAX_CHARS:
        return "; ListOperators lists the known ones"
    by_folded = {_folded(name): name for name in REGISTRY}
    folded = _folded(op_type)
    # The same name but for case and separators is the one meant; otherwise the closest few.
    close = [folded] if folded in by_folded else difflib.get_close_matches(folded, by_folded, n=3, cutoff=0.6)
    if not close:
        return "; ListOperators lists the known ones"
    names = [repr(by_folded[c]) for c in close]
    return f"; did you mean {names[0]}?" if len(names) == 1 else f"; did you mean {', '.join(names[:-1])} or {names[-1]}?"
