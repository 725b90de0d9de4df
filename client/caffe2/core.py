"""Caffe2's `core` for a remote workspace: CreateOperator, DeviceOption and a small Net build Caffe2's
own protobufs (`cosserve.caffe2.caffe2_pb2`), as `caffe2.python.core` does; `workspace` sends them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from cosserve.caffe2 import caffe2_pb2

__all__ = ["BlobNames", "CreateOperator", "DeviceOption", "MakeArgument", "Net"]

# Blob names as Caffe2 takes them: one name, or a list of names (anything str() makes a name of,
# such as Caffe2's BlobReference).
BlobNames = str | Sequence[Any]


def DeviceOption(
    device_type: int,
    device_id: int = 0,
    random_seed: int | None = None,
    node_name: str | None = None,
    numa_node_id: int | None = None,
    extra_info: Iterable[str] | None = None,
) -> caffe2_pb2.DeviceOption:
    """A DeviceOption, as caffe2.python.core.DeviceOption: device_type caffe2_pb2.CPU (0) or
    caffe2_pb2.CUDA (1); device_id the CUDA device's index."""
    option = caffe2_pb2.DeviceOption(device_type=device_type, device_id=device_id)
    if random_seed is not None:
        option.random_seed = random_seed
    if node_name is not None:
        option.node_name = node_name
    if numa_node_id is not None:
        if device_type != caffe2_pb2.CPU:
            raise ValueError("numa_node_id is for CPU device options only (as in Caffe2)")
        option.numa_node_id = numa_node_id
    if extra_info is not None:
        option.extra_info.extend(extra_info)
    return option


def _names(blobs: BlobNames) -> list[str]:
    """Caffe2's _RectifyInputOutput: one name or a list of names, as a list of str."""
    if isinstance(blobs, str):
        return [blobs]
    if isinstance(blobs, bytes) or not isinstance(blobs, Sequence):
        raise TypeError(f"blob names are a str or a list of them, got {type(blobs).__name__}")
    return [str(b) for b in blobs]


def MakeArgument(key: str, value: Any) -> caffe2_pb2.Argument:
    """An Argument from a Python value, as caffe2.python.utils.MakeArgument: a float is `f`, an int
    or a bool `i` (Caffe2 stores bools as ints), a str or bytes `s`, a list `floats`, `ints` or
    `strings`. (cosserve's operators take no list; the server says so by name.)"""
    argument = caffe2_pb2.Argument(name=key)
    if isinstance(value, np.ndarray):
        value = value.flatten().tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        argument.f = value
    elif isinstance(value, int):  # bool included
        argument.i = int(value)
    elif isinstance(value, bytes):
        argument.s = value
    elif isinstance(value, str):
        argument.s = value.encode("utf-8")
    elif isinstance(value, Iterable):
        items = list(value)
        if all(isinstance(v, float) for v in items):
            argument.floats.extend(items)
        elif all(isinstance(v, int) for v in items):
            argument.ints.extend(int(v) for v in items)
        elif all(isinstance(v, (str, bytes)) for v in items):
            argument.strings.extend(v.encode("utf-8") if isinstance(v, str) else v for v in items)
        else:
            raise ValueError(f"argument {key}={value!r}: a list of mixed or unknown types")
    else:
        raise ValueError(f"argument {key}={value!r}: expected a float, int, bool, str, bytes or a list of them")
    return argument


def CreateOperator(
    operator_type: str,
    inputs: BlobNames,
    outputs: BlobNames,
    name: str = "",
    control_input: BlobNames | None = None,
    device_option: caffe2_pb2.DeviceOption | None = None,
    arg: Iterable[caffe2_pb2.Argument] | None = None,
    engine: str | None = None,
    debug_info: str | None = None,
    **kwargs: Any,
) -> caffe2_pb2.OperatorDef:
    """Caffe2's OperatorDef for one operator, as caffe2.python.core.CreateOperator; keyword
    arguments become its arguments (None ones are left out, as in Caffe2). The result is a
    protobuf message: `.SerializeToString()` is Caffe2's own encoding, which
    workspace.RunOperatorOnce sends unchanged."""
    operator = caffe2_pb2.OperatorDef(type=operator_type, name=name)
    operator.input.extend(_names(inputs))
    operator.output.extend(_names(outputs))
    if control_input:
        operator.control_input.extend(_names(control_input))
    if device_option is not None:
        operator.device_option.CopyFrom(device_option)
    if engine is not None:
        operator.engine = engine
    if debug_info is not None:
        operator.debug_info = debug_info
    if "random_seed" in kwargs:  # Caffe2 keeps the seed in the device option
        operator.device_option.random_seed = kwargs.pop("random_seed")
    if arg is not None:
        operator.arg.extend(arg)
    for key, value in kwargs.items():
        if value is not None:
            operator.arg.append(MakeArgument(key, value))
    return operator


class Net:
    """A NetDef built op by op, as a small part of caffe2.python.core.Net: `net.CosineSimilarity(
    ["X", "Y"], "S")` adds an op and returns its output name (a tuple of names for several);
    `Proto()` is the NetDef that workspace.RunNetOnce sends."""

    def __init__(self, name: str = "net") -> None:
        self._net = caffe2_pb2.NetDef(name=name)

    def Name(self) -> str:
        return self._net.name

    def Proto(self) -> caffe2_pb2.NetDef:
        return self._net

    def AddExternalInput(self, *names: Any) -> None:
        self._net.external_input.extend(str(n) for n in names)

    def AddExternalOutput(self, *names: Any) -> None:
        self._net.external_output.extend(str(n) for n in names)

    def __getattr__(self, op_type: str) -> Any:
        if op_type.startswith("_"):
            raise AttributeError(op_type)

        def add(inputs: BlobNames, outputs: BlobNames, **kwargs: Any) -> str | tuple[str, ...]:
            op = CreateOperator(op_type, inputs, outputs, **kwargs)
            self._net.op.append(op)
            names = tuple(op.output)
            return names[0] if len(names) == 1 else names

        return add
