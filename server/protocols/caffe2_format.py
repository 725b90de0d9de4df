"""Caffe2's own encodings: a serialized caffe2 OperatorDef or NetDef turned into engine.OpCalls.
No gRPC here."""

from __future__ import annotations

from typing import Any

import torch
from google.protobuf.message import DecodeError, Message

from cosserve.caffe2 import caffe2_pb2 as c2
from cosserve.server.compute.engine import OpCall, check_net_count, check_op_counts
from cosserve.server.errors import FailedPrecondition, InvalidArgument, quoted

__all__ = ["CPU", "CUDA", "net_calls", "operator_calls"]

# DeviceOption.device_type values cosserve serves (Caffe2's PROTO_CPU and PROTO_CUDA).
CPU = c2.CPU
CUDA = c2.CUDA

# Fields of Argument that hold a Caffe2 message no cosserve operator takes, with what they hold.
_MESSAGE_FIELDS = {
    "n": "a NetDef",
    "nets": "NetDefs",
    "t": "a TensorProto",
    "tensors": "TensorProtos",
    "qtensors": "QTensorProtos",
}
_LIST_FIELDS = {"floats": "floats", "ints": "ints", "strings": "strings"}
_SINGULAR_FIELDS = ("f", "i", "s")
# OperatorDef.domain values that name Caffe2's operator library ("" is the legacy default).
_CAFFE2_DOMAINS = ("", "caffe2")
# Characters of protobuf's own parse error kept in a message.
_PARSE_ERROR_CHARS = 200


def operator_calls(data: bytes, device: torch.device) -> list[OpCall]:
    """The one call a serialized caffe2 OperatorDef (RunOperatorRequest.caffe2_op) asks for, for a
    session whose blobs are on `device`.

    Raises:
        InvalidArgument: bytes that are not an OperatorDef, or a field cosserve cannot honour.
        FailedPrecondition: a device_option naming another device than the session's.
    """
    op = _parsed(c2.OperatorDef(), data, "caffe2_op", "OperatorDef")
    return [_op_call(op, device, "caffe2_op")]


def net_calls(data: bytes, device: torch.device) -> list[OpCall]:
    """The calls of a serialized caffe2 NetDef (RunNetRequest.caffe2_net), in order, after Caffe2's
    checks of external_input and external_output; the net's device_option applies to every op
    that has none, as in Caffe2."""
    net = _parsed(c2.NetDef(), data, "caffe2_net", "NetDef")
    where = f"caffe2_net {quoted(_text(net.name, 'caffe2_net: name'))}" if net.name else "caffe2_net"
    for field, count in (("op", len(net.op)), ("external_input", len(net.external_input)),
                         ("external_output", len(net.external_output))):
        check_net_count(count, where, field)  # bounded before anything is converted (engine.MAX_NET_OPS)
    calls = []
    for position, op in enumerate(net.op):
        if not op.HasField("device_option") and net.HasField("device_option"):
            op.device_option.CopyFrom(net.device_option)
        calls.append(_op_call(op, device, f"{where} op #{position} ({quoted(_text(op.type, where))})"))
    _check_externals(net, calls, where)
    return calls


def _parsed(message: Message, data: bytes, field: str, kind: str) -> Any:
    try:
        message.ParseFromString(data)
    except DecodeError as err:
        raise InvalidArgument(
            f"{field}: {len(data)} bytes that are not a serialized Caffe2 {kind}: {str(err)[:_PARSE_ERROR_CHARS]}"
        ) from None
    return message


def _text(value: str | bytes, where: str) -> str:
    # proto2 does not check UTF-8 when parsing: a string field that is not UTF-8 reads as bytes.
    if isinstance(value, bytes):
        raise InvalidArgument(f"{where}: a name or type of {len(value)} bytes that are not UTF-8")
    return value


def _op_call(op: Any, device: torch.device, where: str) -> OpCall:
    op_type = _text(op.type, where)
    check_op_counts(len(op.arg), len(op.input), len(op.output), where)
    domain = _text(op.domain, where)
    if domain not in _CAFFE2_DOMAINS:
        raise InvalidArgument(
            f"{where}: domain {quoted(domain)} is not Caffe2's operator library; cosserve runs Caffe2's "
            "(domain '' or 'caffe2')"
        )
    if op.HasField("device_option"):
        _check_device(op.device_option, device, where)
    args: dict[str, Any] = {}
    for arg in op.arg:
        name = _text(arg.name, where)
        if name in args:
            raise InvalidArgument(f"{where}: argument {quoted(name)} is given twice")
        args[name] = _argument_value(arg, name, where)
    # engine, control_input, is_gradient_op, debug_info, name and op_version change nothing here:
    # Caffe2 falls back to the default engine, and a net runs its ops in order.
    inputs = tuple(_text(n, where) for n in op.input)
    outputs = tuple(_text(n, where) for n in op.output)
    return OpCall(op_type, inputs, outputs, args)


def _argument_value(arg: Any, name: str, where: str) -> Any:
    """The single value of a Caffe2 Argument: f (a float32), i (an int, or a bool as 0/1) or s."""
    for field, what in _MESSAGE_FIELDS.items():
        if arg.HasField(field) if field in ("n", "t") else len(getattr(arg, field)):
            raise InvalidArgument(
                f"{where}: argument {quoted(name)} holds {what} (Argument.{field}); cosserve's operators take a "
                "single f, i or s"
            )
    for field, what in _LIST_FIELDS.items():
        count = len(getattr(arg, field))
        if count:
            raise InvalidArgument(
                f"{where}: argument {quoted(name)} is a list of {count} {what} (Argument.{field}); no cosserve "
                "operator takes a list argument, only a single f, i or s"
            )
    present = [field for field in _SINGULAR_FIELDS if arg.HasField(field)]
    if not present:
        raise InvalidArgument(
            f"{where}: argument {quoted(name)} has no value (set f, i or s; Caffe2 writes an empty list so)"
        )
    if len(present) > 1:
        raise InvalidArgument(f"{where}: argument {quoted(name)} sets {' and '.join(present)}; set one of f, i, s")
    value = getattr(arg, present[0])
    if present[0] == "s":
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument(f"{where}: argument {quoted(name)}: s is {len(value)} bytes that are not UTF-8") from None
    return value


def _check_device(option: Any, device: torch.device, where: str) -> None:
    """A device_option must name the session's device: the session's blobs live there, and moving
    them for one op would be a hidden copy (Caffe2 too refuses an op whose inputs are elsewhere)."""
    if option.device_type == CPU:
        wanted = torch.device("cpu")
    elif option.device_type == CUDA:
        wanted = torch.device("cuda", option.device_id)
    else:
        raise InvalidArgument(
            f"{where}: device_option.device_type {option.device_type} is not served; 0 (CPU) or 1 (CUDA)"
        )
    here = device if device.type == "cpu" else torch.device("cuda", device.index or 0)
    if wanted != here:
        raise FailedPrecondition(
            f"{where}: device_option asks for {wanted} but this session's blobs are on {here}; "
            f"run it in a session created on {wanted}, or leave device_option out"
        )


def _check_externals(net: Any, calls: list[OpCall], where: str) -> None:
    """Caffe2's checks when it creates a net: with external_input declared, every input is one of
    them or an earlier op's output; every external_output is produced (or is an external input)."""
    external_inputs = [_text(n, where) for n in net.external_input]
    known = set(external_inputs)
    for position, call in enumerate(calls):
        if external_inputs:
            for name in call.inputs:
                if name not in known:
                    raise InvalidArgument(
                        f"{where} op #{position} ({quoted(call.type)}): input {quoted(name)} is neither an "
                        "external_input of the net nor an output of an earlier op"
                    )
        known.update(call.outputs)
    for name in net.external_output:
        name = _text(name, where)
        if name not in known:
            raise InvalidArgument(f"{where}: external_output {quoted(name)} is never produced by the net")
