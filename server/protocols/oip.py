"""The Open Inference Protocol's view of the operator registry: models, requests, statistics. No gRPC here.

Every registered operator is a model: name = op type, one version "1", the schema's inputs and
outputs as tensors, its arguments as request parameters. `model_metadata` and `model_config`
describe one, for either binding (gRPC or REST). `decode_request` turns a
ModelInferRequest into the engine.OpCall and input tensors that Compute would run, checking every
header before anything is allocated; `encode_response` turns the outputs into the reply; and
`Statistics` keeps what ModelStatistics reports.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import torch

from cosserve.inference import grpc_service_pb2 as pb
from cosserve.inference import model_config_pb2 as config_pb
from cosserve.server import memory
from cosserve.server.compute import engine
from cosserve.server.compute.registry import REGISTRY, InputKind, Operator, lookup
from cosserve.server.errors import InvalidArgument, NotFound, ResourceExhausted
from cosserve.server.protocols import codec

__all__ = [
    "DATATYPES",
    "EXTENSIONS",
    "PLATFORM",
    "VERSION",
    "DecodedRequest",
    "Model",
    "Statistics",
    "TensorInfo",
    "decode_request",
    "encode_response",
    "is_ready",
    "model",
    "model_config",
    "model_metadata",
    "models",
    "timed",
]

# The one version of every model: operators are built in and never reloaded.
VERSION = "1"
PLATFORM = "cosserve"
# The protocol extensions served (Triton's names): request parameters and ModelStatistics. Not
# served: classification, sequence, model_repository, schedule_policy, system_shared_memory,
# cuda_shared_memory, trace, logging. binary_tensor_data is the REST binding's
# (Inference-Header-Content-Length); gRPC always carries tensors raw.
EXTENSIONS = ("parameters", "statistics", "model_configuration", "binary_tensor_data")

# The v2 datatypes served, and their torch dtypes (the same ten as cosserve's own wire).
DATATYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "FP16": torch.float16,
    "BF16": torch.bfloat16,
    "FP32": torch.float32,
    "FP64": torch.float64,
}
_DATATYPE_NAMES = {dtype: name for name, dtype in DATATYPES.items()}

# The InferTensorContents field of each datatype and the range of values it may hold there
# (int_contents carries INT8 and INT16 as int32, uint_contents UINT8 as uint32). FP16 and BF16
# have no field: the protocol sends them raw.
_CONTENTS: dict[str, tuple[str, Any]] = {
    "BOOL": ("bool_contents", np.bool_),
    "UINT8": ("uint_contents", np.uint8),
    "INT8": ("int_contents", np.int8),
    "INT16": ("int_contents", np.int16),
    "INT32": ("int_contents", np.int32),
    "INT64": ("int64_contents", np.int64),
    "FP32": ("fp32_contents", np.float32),
    "FP64": ("fp64_contents", np.float64),
}
_CONTENTS_FIELDS = tuple(f.name for f in pb.InferTensorContents.DESCRIPTOR.fields)

# The datatype ModelMetadata gives each kind of input: Caffe2's (float32, int32 labels). The
# other floating dtypes and int64 labels are accepted too (engine.ACCEPTED_DTYPES).
_INPUT_DATATYPES = {InputKind.FLOAT: "FP32", InputKind.LABEL: "INT32"}
# Outputs follow the floating inputs, except these, whose dtype is fixed by the op.
_FIXED_OUTPUT_DATATYPES = {("CosineTopK", "Indices"): "INT64"}
# The registry declares no ranks: every op takes its inputs at any rank and checks them per call.
_ANY_SHAPE = (-1,)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One input or output of a model, as ModelMetadata lists it."""

    name: str
    datatype: str
    shape: tuple[int, ...] = _ANY_SHAPE


@dataclasses.dataclass(frozen=True)
class Model:
    """An operator seen as a model."""

    name: str
    op: Operator
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]

    @classmethod
    def of(cls, op: Operator) -> Model:
        schema = op.schema
        return cls(
            schema.name,
            op,
            tuple(TensorInfo(i.name, _INPUT_DATATYPES[i.kind]) for i in schema.inputs),
            tuple(TensorInfo(o, _FIXED_OUTPUT_DATATYPES.get((schema.name, o), "FP32")) for o in schema.outputs),
        )


def models() -> list[Model]:
    """Every model, by name."""
    return [Model.of(REGISTRY[name]) for name in sorted(REGISTRY)]


def model(name: str, version: str = "") -> Model:
    """The model `name` at `version` ("" or "1"); NotFound, with the closest name, otherwise."""
    try:
        op = lookup(name)
    except InvalidArgument as err:  # an unknown model is NOT_FOUND, with the registry's "did you mean"
        raise NotFound(f"unknown model: {err}") from None
    if version not in ("", VERSION):
        raise NotFound(f"model {name!r} has no version {version!r}; its only version is {VERSION!r}")
    return Model.of(op)


def is_ready(name: str, version: str = "") -> bool:
    return name in REGISTRY and version in ("", VERSION)


def model_metadata(name: str, version: str = "") -> pb.ModelMetadataResponse:
    """ModelMetadata's answer for the model `name` at `version` (NotFound as `model`)."""
    found = model(name, version)
    return pb.ModelMetadataResponse(
        name=found.name,
        versions=[VERSION],
        platform=PLATFORM,
        inputs=[pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape) for t in found.inputs],
        outputs=[pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape) for t in found.outputs],
    )


def model_config(name: str, version: str = "") -> pb.ModelConfigResponse:
    """ModelConfig's answer (Triton's message) for the model `name` at `version` (NotFound as
    `model`): the metadata's tensors with their data types and dims. max_batch_size is 0, the
    operator's own dims being the whole tensor's: no dimension is a batch the server forms."""
    found = model(name, version)
    config = config_pb.ModelConfig(name=found.name, platform=PLATFORM, max_batch_size=0)
    for t in found.inputs:
        config.input.add(name=t.name, data_type=config_pb.DataType.Value(f"TYPE_{t.datatype}"), dims=t.shape)
    for t in found.outputs:
        config.output.add(name=t.name, data_type=config_pb.DataType.Value(f"TYPE_{t.datatype}"), dims=t.shape)
    return pb.ModelConfigResponse(config=config)


# ---- requests ---------------------------------------------------------------------------


@dataclasses.dataclass
class DecodedRequest:
    """What ModelInfer runs: the op call (inputs and outputs under the schema's names), its
    input tensors, their bytes, and the outputs to return, in order."""

    call: engine.OpCall
    inputs: dict[str, torch.Tensor]
    nbytes: int
    returned: list[str]


def _parameter(what: str, value: pb.InferParameter) -> Any:
    kind = value.WhichOneof("parameter_choice")
    if kind is None:
        raise InvalidArgument(f"{what} has no value")
    return getattr(value, kind)


def _refuse_tensor_parameters(what: str, parameters: Mapping[str, pb.InferParameter]) -> None:
    if parameters:
        names = ", ".join(repr(k) for k in sorted(parameters)[:4])
        raise InvalidArgument(
            f"{what} has parameters {names}; tensor parameters are not served (no shared memory, no "
            "classification): send the data in the request"
        )


def decode_request(found: Model, request: pb.ModelInferRequest, device: torch.device) -> DecodedRequest:
    """The call a ModelInferRequest asks of its model `found` (`model(request.model_name, ...)`).
    Every input's header is checked and its byte length matched to its shape before any tensor is
    made (raw inputs are views of the request's bytes; typed contents are converted only when their
    count matches the shape)."""
    schema = found.op.schema
    # Counted before converted, as for our own OperatorDef (engine.check_op_counts).
    engine.check_op_counts(len(request.parameters), len(request.inputs), len(request.outputs), schema.name)
    args = {name: _parameter(f"{schema.name}: parameter {name!r}", value) for name, value in request.parameters.items()}
    expected = [i.name for i in schema.inputs]
    names = [i.name for i in request.inputs]
    if sorted(names) != sorted(expected):
        raise InvalidArgument(
            f"{schema.name} takes the inputs {', '.join(expected)} (each once, by name), got {names[:8]}"
        )
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"{schema.name}: raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
            "send one per input, in the order of inputs"
        )
    inputs: dict[str, torch.Tensor] = {}
    nbytes = 0
    for position, item in enumerate(request.inputs):
        what = f"{schema.name}: input {item.name!r}"
        _refuse_tensor_parameters(what, item.parameters)
        dtype = DATATYPES.get(item.datatype)
        if dtype is None:
            raise InvalidArgument(f"{what}: datatype must be one of {', '.join(DATATYPES)}, got {item.datatype[:32]!r}")
        shape = tuple(item.shape)
        size = codec.check_header(what, codec.WIRE_DTYPES[dtype], shape)  # before anything is allocated
        has_contents = any(len(getattr(item.contents, f)) for f in _CONTENTS_FIELDS)
        if raw:
            if has_contents:
                raise InvalidArgument(f"{what}: contents and raw_input_contents are both set; send one")
            tensor = _from_raw(what, dtype, shape, raw[position], size)
        else:
            tensor = _from_contents(what, item.datatype, dtype, shape, item.contents)
        inputs[item.name] = _to_device(what, tensor, device)
        nbytes += size
    outputs = list(schema.outputs)
    returned = [o.name for o in request.outputs]
    for requested in request.outputs:
        _refuse_tensor_parameters(f"{schema.name}: requested output {requested.name!r}", requested.parameters)
    unknown = [n for n in returned if n not in outputs]
    if unknown or len(set(returned)) != len(returned):
        raise InvalidArgument(
            f"{schema.name}: requested outputs must be among {', '.join(outputs)}, each once; got {returned[:8]}"
        )
    call = engine.OpCall(schema.name, tuple(expected), tuple(outputs), args)
    return DecodedRequest(call, inputs, nbytes, returned or outputs)


def _from_raw(what: str, dtype: torch.dtype, shape: tuple[int, ...], data: bytes, size: int) -> torch.Tensor:
    """A view of `data` (the request's own bytes, immutable: ops never write in place)."""
    if len(data) != size:
        raise InvalidArgument(f"{what}: raw_input_contents has {len(data)} bytes, but {_DATATYPE_NAMES[dtype]} {list(shape)} needs {size}")
    if size == 0:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(data, dtype=torch.uint8, count=size)
    if dtype is torch.bool and bool((flat > 1).any()):
        raise InvalidArgument(f"{what}: BOOL bytes must be 0 or 1")
    return flat.view(dtype).reshape(shape)


def _from_contents(
    what: str, datatype: str, dtype: torch.dtype, shape: tuple[int, ...], contents: pb.InferTensorContents
) -> torch.Tensor:
    entry = _CONTENTS.get(datatype)
    if entry is None:
        raise InvalidArgument(f"{what}: {datatype} has no typed contents in the protocol; send it in raw_input_contents")
    field, np_type = entry
    count = math.prod(shape)
    values = getattr(contents, field)
    if len(values) != count:
        raise InvalidArgument(f"{what}: contents.{field} has {len(values)} values, but {datatype} {list(shape)} needs {count}")
    stray = [f for f in _CONTENTS_FIELDS if f != field and len(getattr(contents, f))]
    if stray:
        raise InvalidArgument(f"{what}: a {datatype} tensor's values go in contents.{field}, not {', '.join(stray)}")
    # int_contents and uint_contents are wider than INT8, INT16 and UINT8: a value outside the
    # datatype is refused, not wrapped.
    wide = np.asarray(values)
    array = wide.astype(np_type)
    if np_type in (np.int8, np.int16, np.uint8) and count and not np.array_equal(array, wide):
        info = np.iinfo(np_type)
        raise InvalidArgument(f"{what}: {datatype} values must be in [{info.min}, {info.max}]")
    return torch.from_numpy(array.reshape(shape))


def _to_device(what: str, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return tensor
    try:
        return tensor.to(device)
    except Exception as err:
        if memory.is_out_of_memory(err):
            raise ResourceExhausted(f"{what}: the server cannot allocate it now; try a smaller one") from None
        raise


def encode_response(request: pb.ModelInferRequest, decoded: DecodedRequest, outputs: Sequence[torch.Tensor]) -> pb.ModelInferResponse:
    """The reply: the returned outputs' headers in `outputs`, their bytes in raw_output_contents."""
    by_name = dict(zip(decoded.call.outputs, outputs))
    response = pb.ModelInferResponse(model_name=decoded.call.type, model_version=VERSION, id=request.id)
    for name in decoded.returned:
        tensor = by_name[name]
        response.outputs.add(name=name, datatype=_DATATYPE_NAMES[tensor.dtype], shape=tensor.shape)
        response.raw_output_contents.append(memory.tensor_bytes(tensor).tobytes())
    return response


T = TypeVar("T")


def timed(fn: Callable[..., T], *args: Any) -> tuple[T, int, int]:
    """fn(*args) with the perf_counter_ns at which it started and ended (on whichever thread ran
    it), so the caller can tell the wait for a worker from the work."""
    started = time.perf_counter_ns()
    result = fn(*args)
    return result, started, time.perf_counter_ns()


# ---- statistics -------------------------------------------------------------------------


@dataclasses.dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += max(0, ns)


@dataclasses.dataclass
class _ModelCounters:
    last_inference_ms: int = 0
    success: _Duration = dataclasses.field(default_factory=_Duration)
    fail: _Duration = dataclasses.field(default_factory=_Duration)
    queue: _Duration = dataclasses.field(default_factory=_Duration)
    compute_input: _Duration = dataclasses.field(default_factory=_Duration)
    compute_infer: _Duration = dataclasses.field(default_factory=_Duration)
    compute_output: _Duration = dataclasses.field(default_factory=_Duration)


class Statistics:
    """Cumulative counts and times per model since start, as ModelStatistics reports them.
    Updated and read on the server's event loop only, so it needs no lock."""

    def __init__(self) -> None:
        self._models: dict[str, _ModelCounters] = {}

    def succeeded(self, name: str, total_ns: int, queue_ns: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        counters = self._models.setdefault(name, _ModelCounters())
        counters.success.add(total_ns)
        counters.queue.add(queue_ns)
        counters.compute_input.add(input_ns)
        counters.compute_infer.add(infer_ns)
        counters.compute_output.add(output_ns)
        counters.last_inference_ms = time.time_ns() // 1_000_000

    def failed(self, name: str, total_ns: int) -> None:
        counters = self._models.setdefault(name, _ModelCounters())
        counters.fail.add(total_ns)
        counters.last_inference_ms = time.time_ns() // 1_000_000

    def message(self, name: str, version: str = "") -> pb.ModelStatisticsResponse:
        """Statistics of the model `name` (NotFound if there is none), or of every model for ''."""
        names = [m.name for m in models()] if not name else [model(name, version).name]
        response = pb.ModelStatisticsResponse()
        for model_name in names:
            c = self._models.get(model_name, _ModelCounters())
            stats = response.model_stats.add(
                name=model_name,
                version=VERSION,
                last_inference=c.last_inference_ms,
                inference_count=c.success.count,
                execution_count=c.success.count,
            )
            for field in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
                duration: _Duration = getattr(c, field)
                target = getattr(stats.inference_stats, field)
                target.count = duration.count
                target.ns = duration.ns
        return response
