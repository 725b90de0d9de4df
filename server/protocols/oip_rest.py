"""The Open Inference Protocol's HTTP/REST binding: JSON (and binary tensor data) <-> the gRPC messages.

No HTTP library here: server/edge/rest.py reads the request and writes the answer. An infer request
becomes the very pb.ModelInferRequest gRPC's ModelInfer receives (every input's data as raw bytes),
so both bindings run one path from there on (oip.decode_request, the engine, oip.encode_response);
the answer is the JSON of the pb.ModelInferResponse, each output's data either as a JSON list or,
with the binary tensor data extension, as bytes after the JSON (Triton's
`Inference-Header-Content-Length` says where the JSON ends). Every other answer is the JSON of
its gRPC reply (`as_json`), as Triton's REST API writes them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import ml_dtypes
import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from cosserve.inference import grpc_service_pb2 as pb
from cosserve.server.compute import engine
from cosserve.server.errors import InvalidArgument

__all__ = ["HEADER_LENGTH", "Reply", "as_json", "infer_reply", "infer_request", "parse_header_length"]

# The HTTP header of the binary tensor data extension: the JSON's bytes at the start of a body.
HEADER_LENGTH = "Inference-Header-Content-Length"

# The numpy dtype of each v2 datatype a JSON list can carry.
_NUMPY: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "FP32": np.float32,
    "FP64": np.float64,
}
# The kinds of JSON number numpy makes of a list (bool, signed, unsigned, float) each datatype takes.
_ACCEPTED_KINDS = {
    "BOOL": "b",
    **{name: "iu" for name in ("UINT8", "INT8", "INT16", "INT32", "INT64")},
    **{name: "iuf" for name in ("FP16", "BF16", "FP32", "FP64")},
}
# Dimensions of a shape at most, and the largest dimension: past these no tensor could fit a
# message, and the checks below need not meet Python's unbounded ints.
_MAX_RANK = 64
_MAX_DIM = 2**62

# Request and tensor parameters that belong to the binding, not to the operator.
_BINARY_OUTPUT = "binary_data_output"
_BINARY_SIZE = "binary_data_size"
_BINARY = "binary_data"


def parse_header_length(value: str | None, body_bytes: int) -> int | None:
    """The JSON's length from an Inference-Header-Content-Length value (None: the whole body)."""
    if value is None:
        return None
    text = value.strip()
    if not text.isdigit() or len(text) > 19:
        raise InvalidArgument(f"{HEADER_LENGTH} must be a byte count, got {value[:32]!r}")
    length = int(text)
    if length > body_bytes:
        raise InvalidArgument(f"{HEADER_LENGTH} is {length}, but the body has only {body_bytes} bytes")
    return length


# ---- JSON of the replies -------------------------------------------------------------------


def as_json(message: Message) -> dict[str, Any]:
    """A reply as Triton's REST API writes it: every field by its proto name, numbers as JSON
    numbers (protobuf's own JSON writes 64-bit ones as strings), enums by name."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {k: _json_value(value_field, v) for k, v in value.items()}
        elif _is_repeated(field):
            out[field.name] = [_json_value(field, v) for v in value]
        elif field.message_type is not None and not message.HasField(field.name):
            continue  # an unset message is left out, as protobuf's JSON does
        else:
            out[field.name] = _json_value(field, value)
    return out


def _is_repeated(field: FieldDescriptor) -> bool:
    # FieldDescriptor.label is deprecated in newer protobuf; is_repeated is missing in older.
    repeated = getattr(field, "is_repeated", None)
    return bool(repeated) if repeated is not None else field.label == FieldDescriptor.LABEL_REPEATED


def _json_value(field: FieldDescriptor, value: Any) -> Any:
    if field.message_type is not None:
        return as_json(value)
    if field.enum_type is not None:
        return field.enum_type.values_by_number[value].name if value in field.enum_type.values_by_number else value
    return value


# ---- infer requests -------------------------------------------------------------------------


@dataclasses.dataclass
class Reply:
    """How the outputs go back: as binary data (by name, or all with `every`) or as JSON lists."""

    every: bool = False
    binary: set[str] = dataclasses.field(default_factory=set)
    json_lists: set[str] = dataclasses.field(default_factory=set)

    def is_binary(self, name: str) -> bool:
        return name in self.binary or (self.every and name not in self.json_lists)


def _object(what: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _list(what: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidArgument(f"{what} must be a JSON list, got {type(value).__name__}")
    return value


def _text(what: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string, got {type(value).__name__}")
    return value


def _set_parameter(what: str, target: pb.InferParameter, value: Any) -> None:
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise InvalidArgument(f"{what} must fit int64, got a {value.bit_length()}-bit number")
        target.int64_param = value
    elif isinstance(value, float):
        target.double_param = value
    elif isinstance(value, str):
        target.string_param = value
    else:
        raise InvalidArgument(f"{what} must be a bool, a number or a string, got {type(value).__name__}")


def _flag(what: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{what} must be true or false, got {type(value).__name__}")
    return value


def infer_request(model_name: str, version: str, body: bytes, header_length: int | None) -> tuple[pb.ModelInferRequest, Reply]:
    """The ModelInferRequest a REST infer body asks for, and how its outputs go back.

    The JSON is `body[:header_length]` (all of it without the extension); inputs whose parameters
    give a `binary_data_size` take their bytes, in order, from what follows it, and those sizes
    must add up to exactly that. Each input's JSON `data` (a flat or nested list) is checked
    against its datatype and shape and becomes raw bytes, so every input reaches
    oip.decode_request as gRPC's raw_input_contents would."""
    end = len(body) if header_length is None else header_length
    try:
        document = json.loads(body[:end])
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise InvalidArgument(f"the request body is not JSON: {str(err)[:200]}") from None
    document = _object("the request", document)
    request = pb.ModelInferRequest(model_name=model_name, model_version=version)
    reply = Reply()
    request.id = _text("'id'", document.get("id", ""))
    parameters = _object("'parameters'", document.get("parameters", {}))
    inputs = _list("'inputs'", document.get("inputs"))
    outputs = _list("'outputs'", document.get("outputs", []))
    # Counted before anything is converted, as gRPC's decode_request counts them.
    engine.check_op_counts(len(parameters), len(inputs), len(outputs), model_name)
    for key, value in parameters.items():
        if key == _BINARY_OUTPUT:
            reply.every = _flag(f"parameter {_BINARY_OUTPUT!r}", value)
        else:
            _set_parameter(f"parameter {key!r}", request.parameters[key], value)
    offset = end
    for position, item in enumerate(inputs):
        item = _object(f"inputs[{position}]", item)
        name = _text(f"inputs[{position}].name", item.get("name"))
        what = f"{model_name}: input {name!r}"
        datatype = _text(f"{what}: 'datatype'", item.get("datatype"))
        shape = _shape(what, item.get("shape"))
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        size: Any = None
        tensor_parameters = _object(f"{what}: 'parameters'", item.get("parameters", {}))
        engine.check_op_counts(len(tensor_parameters), 0, 0, what)
        for key, value in tensor_parameters.items():
            if key == _BINARY_SIZE:
                size = value
            else:
                _set_parameter(f"{what}: parameter {key!r}", tensor.parameters[key], value)
        if size is not None:
            if "data" in item:
                raise InvalidArgument(f"{what}: has both 'data' and a {_BINARY_SIZE!r}; send one")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidArgument(f"{what}: {_BINARY_SIZE!r} must be a byte count")
            if offset + size > len(body):
                raise InvalidArgument(
                    f"{what}: {_BINARY_SIZE!r} is {size}, but only {len(body) - offset} bytes of binary data are left"
                )
            request.raw_input_contents.append(body[offset : offset + size])
            offset += size
        else:
            if "data" not in item:
                raise InvalidArgument(f"{what}: has neither 'data' nor a {_BINARY_SIZE!r} parameter")
            request.raw_input_contents.append(_json_data(what, datatype, shape, item["data"]))
    if offset != len(body):
        raise InvalidArgument(
            f"the body has {len(body) - offset} bytes after the JSON and the inputs' {_BINARY_SIZE!r} (of {len(body)})"
        )
    for position, item in enumerate(outputs):
        item = _object(f"outputs[{position}]", item)
        name = _text(f"outputs[{position}].name", item.get("name"))
        output = request.outputs.add(name=name)
        output_parameters = _object(f"{model_name}: output {name!r}: 'parameters'", item.get("parameters", {}))
        engine.check_op_counts(len(output_parameters), 0, 0, f"{model_name}: output {name!r}")
        for key, value in output_parameters.items():
            if key == _BINARY:
                (reply.binary if _flag(f"output {name!r}: {_BINARY!r}", value) else reply.json_lists).add(name)
            else:
                _set_parameter(f"{model_name}: output {name!r}: parameter {key!r}", output.parameters[key], value)
    return request, reply


def _shape(what: str, value: Any) -> list[int]:
    shape = _list(f"{what}: 'shape'", value)
    if len(shape) > _MAX_RANK or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= _MAX_DIM for d in shape):
        raise InvalidArgument(f"{what}: 'shape' must be a list of at most {_MAX_RANK} dimensions, each a whole number ≥ 0")
    return shape


def _json_data(what: str, datatype: str, shape: list[int], data: Any) -> bytes:
    """The raw bytes of a JSON `data` list of `datatype` (checked: every value of a kind the
    datatype takes, within its range, as many as the shape needs)."""
    np_type = _NUMPY.get(datatype)
    if np_type is None:
        raise InvalidArgument(f"{what}: datatype must be one of {', '.join(_NUMPY)}, got {datatype[:32]!r}")
    data = _list(f"{what}: 'data'", data)
    count = math.prod(shape)
    # The list's own values: at most one 8-byte number per value of the body's JSON, which the
    # body's limit bounds.
    try:
        values = np.asarray(data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise InvalidArgument(f"{what}: 'data' must be a list of numbers, nested lists all of one length") from None
    if values.size != count:
        raise InvalidArgument(f"{what}: 'data' has {values.size} values, but {datatype} {shape} needs {count}")
    if count == 0:
        return b""
    if values.dtype.kind not in _ACCEPTED_KINDS[datatype]:
        kinds = {"b": "true or false", "iu": "whole numbers", "iuf": "numbers"}[_ACCEPTED_KINDS[datatype]]
        raise InvalidArgument(f"{what}: 'data' of a {datatype} tensor must be {kinds}, in range")
    with np.errstate(over="ignore", invalid="ignore"):
        converted = values.astype(np_type)
    if values.dtype.kind in "iu" and np.dtype(np_type).kind in "iu" and count and not np.array_equal(converted, values):
        info = np.iinfo(np_type)
        raise InvalidArgument(f"{what}: {datatype} values must be in [{info.min}, {info.max}]")
    return converted.tobytes()


# ---- infer replies --------------------------------------------------------------------------


def infer_reply(response: pb.ModelInferResponse, reply: Reply) -> tuple[bytes, int | None]:
    """The body of an infer answer, and the JSON's length when binary data follows it (the
    value of Inference-Header-Content-Length), else None."""
    outputs = []
    binary = []
    for tensor, raw in zip(response.outputs, response.raw_output_contents):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if reply.is_binary(tensor.name):
            entry["parameters"] = {_BINARY_SIZE: len(raw)}
            binary.append(raw)
        else:
            values = np.frombuffer(raw, dtype=_NUMPY[tensor.datatype])
            if tensor.datatype in ("FP16", "BF16"):
                values = values.astype(np.float32)
            entry["data"] = values.tolist()
        outputs.append(entry)
    document: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        document["id"] = response.id
    document["outputs"] = outputs
    header = json.dumps(document, separators=(",", ":")).encode()
    if not binary:
        return header, None
    return b"".join([header, *binary]), len(header)
