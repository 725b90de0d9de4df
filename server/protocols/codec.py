"""Wire tensors (dtype code, shape, little-endian bytes) to torch tensors and back."""

from __future__ import annotations

import math
import sys
import typing
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch

from cosserve import wire
from cosserve.limits import readable_bytes
from cosserve.server import memory
from cosserve.server.errors import InvalidArgument, ResourceExhausted
from cosserve.v1 import cosserve_pb2 as pb

__all__ = [
    "TORCH_DTYPES",
    "WIRE_DTYPES",
    "ChunkAssembler",
    "check_header",
    "ids_to_wire",
    "stream_chunks",
    "tensor_from_frame",
    "tensor_from_wire",
    "tensor_to_wire",
]

if sys.byteorder != "little":  # the wire is little-endian and we reinterpret bytes in place
    raise ImportError("cosserve's server needs a little-endian host")

# The wire's DType of each dtype a blob may have, by name (FLOAT16 is torch.float16, ...). The
# values are typed pb.DType, the message fields' type (a subclass of int).
WIRE_DTYPES: dict[torch.dtype, pb.DType] = {
    dtype: typing.cast(pb.DType, pb.DType.Value(memory.dtype_name(dtype).upper())) for dtype in memory.STORED_DTYPES
}
TORCH_DTYPES: dict[int, torch.dtype] = {code: dtype for dtype, code in WIRE_DTYPES.items()}
if len(TORCH_DTYPES) != len(pb.DType.keys()) - 1:  # every DType but DTYPE_UNSPECIFIED
    raise ImportError("the .proto's DType and memory.STORED_DTYPES must name the same dtypes")


def check_header(what: str, dtype_code: int, shape: Sequence[int], max_bytes: int | None = None) -> int:
    """Validate a tensor header before anything is allocated; return its byte size."""
    if dtype_code not in TORCH_DTYPES:
        raise InvalidArgument(f"{what}: dtype must be one of {', '.join(pb.DType.keys()[1:])}, got code {dtype_code}")
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{what}: shape {tuple(shape)} has a negative dimension")
    # Even a zero-size tensor needs its strides, the product of the other dimensions, to fit int64.
    if math.prod(d for d in shape if d) * TORCH_DTYPES[dtype_code].itemsize >= 2**63:
        raise InvalidArgument(f"{what}: shape {tuple(shape)} is too large to index (its size passes 2**63 bytes)")
    nbytes = math.prod(shape) * TORCH_DTYPES[dtype_code].itemsize
    if max_bytes is not None and nbytes > max_bytes:
        raise ResourceExhausted(
            f"{what}: {readable_bytes(nbytes)} is more than the {readable_bytes(max_bytes)} a session may hold (--max-session-bytes)"
        )
    return nbytes


def tensor_from_wire(what: str, message: pb.Tensor, device: torch.device) -> torch.Tensor:
    """Decode a wire Tensor onto `device`; InvalidArgument if the bytes do not fit the header."""
    data = message.data
    return _tensor_at(what, message.dtype, tuple(message.shape), data, 0, len(data), device)


def _tensor_at(
    what: str,
    dtype_code: int,
    shape: tuple[int, ...],
    buffer: bytes,
    start: int,
    end: int,
    device: torch.device,
    max_bytes: int | None = None,
) -> torch.Tensor:
    """The tensor whose bytes are buffer[start:end], after checking them against the header."""
    nbytes = check_header(what, dtype_code, shape, max_bytes)
    if end - start != nbytes:
        raise InvalidArgument(
            f"{what}: data has {end - start} bytes, but {pb.DType.Name(dtype_code)} {shape} needs {nbytes}"
        )
    dtype = TORCH_DTYPES[dtype_code]
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    # `buffer` is an immutable bytes object we own: on CPU the tensor views it (ops never write
    # in place; tensor_from_frame copies what is stored); for another device it is the source of
    # the one copy there.
    flat = torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes, offset=start)
    tensor = flat.view(dtype).reshape(shape)
    if device.type == "cpu":
        return tensor
    try:
        return tensor.to(device)
    except Exception as err:
        memory.refuse_if_out_of_memory(what, err)
        raise


def tensor_from_frame(
    what: str,
    buffer: bytes,
    frame: wire.TensorFrame,
    device: torch.device,
    max_bytes: int | None = None,
) -> torch.Tensor:
    """The tensor of a decoded wire frame whose data lies in `buffer`, in memory of its own (one
    copy): a stored blob must never keep its request alive, which a view of it would, whole."""
    tensor = _tensor_at(what, frame.dtype, frame.shape, buffer, frame.data.start, frame.data.end, device, max_bytes)
    if tensor.device.type == "cpu" and tensor.numel():
        try:
            tensor = tensor.clone()
        except Exception as err:
            memory.refuse_if_out_of_memory(what, err)
            raise
    return tensor


def tensor_to_wire(tensor: torch.Tensor, out: pb.Tensor) -> pb.Tensor:
    out.dtype = WIRE_DTYPES[tensor.dtype]
    out.shape[:] = tensor.shape
    out.data = memory.tensor_bytes(tensor).tobytes()
    return out


def ids_to_wire(ids: pa.Array, out: pb.CorpusIds) -> pb.CorpusIds:
    """Corpus ids (an int64 or large_string Arrow array, no nulls) as a CorpusIds message."""
    if pa.types.is_int64(ids.type):
        _int64_to_wire(ids.to_numpy(zero_copy_only=False), out.int64_ids)
        return out
    offsets = np.frombuffer(ids.buffers()[1], np.int64)[ids.offset : ids.offset + len(ids) + 1]
    start, end = int(offsets[0]), int(offsets[-1])
    _int64_to_wire(offsets - start, out.string_ids.offsets)
    out.string_ids.utf8 = ids.buffers()[2].slice(start, end - start).to_pybytes() if end > start else b""
    return out


def _int64_to_wire(values: np.ndarray, out: pb.Tensor) -> None:
    out.dtype = pb.INT64
    out.shape[:] = values.shape
    out.data = values.astype("<i8", copy=False).tobytes()


def stream_chunks(tensor: torch.Tensor, chunk_bytes: int) -> Iterator[memoryview]:
    """The tensor's bytes in slices of at most chunk_bytes, as host memory views.

    On CPU these are views of the tensor. On CUDA each slice is copied into one of two pinned
    staging buffers while the previous one is being sent, so a slice is only valid until the
    next one is asked for: copy it first.
    """
    if tensor.device.type != "cuda":
        data = memory.tensor_bytes(tensor)
        for start in range(0, len(data), chunk_bytes):
            yield data[start : start + chunk_bytes]
        return
    flat = memory.byte_view(tensor)
    total = flat.numel()
    stream = torch.cuda.current_stream(tensor.device)
    staging = [torch.empty(min(chunk_bytes, total), dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    done: list[torch.cuda.Event | None] = [None, None]

    def start_copy(index: int) -> None:
        begin = index * chunk_bytes
        size = min(chunk_bytes, total - begin)
        with torch.cuda.device(tensor.device):
            staging[index % 2][:size].copy_(flat[begin : begin + size], non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        done[index % 2] = event

    count = -(-total // chunk_bytes)
    if count:
        start_copy(0)
    for index in range(count):
        if index + 1 < count:
            start_copy(index + 1)  # overlaps with sending this one
        event = done[index % 2]
        assert event is not None
        event.synchronize()
        size = min(chunk_bytes, total - index * chunk_bytes)
        yield staging[index % 2][:size].numpy().data


class ChunkAssembler:
    """Collects streamed chunks into one preallocated buffer, then becomes a tensor.

    For a CUDA `device` the buffer is on the device: each chunk goes through one of two pinned
    staging buffers and is copied asynchronously while the next chunk is received, so host
    memory stays at two chunks however big the tensor.
    """

    def __init__(
        self, what: str, dtype_code: int, shape: Sequence[int], max_bytes: int, device: torch.device | None = None
    ) -> None:
        self.what = what
        self.shape = tuple(shape)
        self.nbytes = check_header(what, dtype_code, self.shape, max_bytes)
        self.dtype = TORCH_DTYPES[dtype_code]
        self.device = device if device is not None and device.type == "cuda" else torch.device("cpu")
        self.tensor = memory.empty(self.dtype, self.shape, self.device, what)
        self.buffer = memory.byte_view(self.tensor)
        self.view = self.buffer.numpy() if self.device.type == "cpu" else None
        self._staging: list[torch.Tensor | None] = [None, None]
        self._done: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0
        self.filled = 0

    def add(self, data: bytes | memoryview) -> None:
        end = self.filled + len(data)
        if end > self.nbytes:
            raise InvalidArgument(f"{self.what}: more data than the {self.nbytes} bytes of shape {self.shape}")
        if not len(data):
            return
        if self.view is not None:
            self.view[self.filled : end] = np.frombuffer(data, np.uint8)
        else:
            self._add_cuda(data, end)
        self.filled = end

    def _add_cuda(self, data: bytes | memoryview, end: int) -> None:
        slot = self._turn
        self._turn ^= 1
        event = self._done[slot]
        if event is not None:
            event.synchronize()  # the copy that last used this staging buffer is done
        staging = self._staging[slot]
        if staging is None or staging.numel() < len(data):
            staging = self._staging[slot] = torch.empty(len(data), dtype=torch.uint8, pin_memory=True)
        staging.numpy()[: len(data)] = np.frombuffer(data, np.uint8)
        with torch.cuda.device(self.device):
            self.buffer[self.filled : end].copy_(staging[: len(data)], non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
        self._done[slot] = done

    def discard(self) -> None:
        """Let go of the buffer now, whoever still holds the assembler (a failed call's traceback,
        which grpc keeps in a reference cycle until the next GC)."""
        self.tensor = self.buffer = torch.empty(0, dtype=torch.uint8)
        self.view = None
        self._staging = [None, None]

    def finish(self, device: torch.device) -> torch.Tensor:
        if self.filled != self.nbytes:
            raise InvalidArgument(
                f"{self.what}: stream ended after {self.filled} of {self.nbytes} bytes of shape {self.shape}"
            )
        if self.device.type == "cuda":
            for event in self._done:
                if event is not None:
                    event.synchronize()
        return self.tensor.to(device)
