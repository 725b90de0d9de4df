"""Wire tensors (dtype code, shape, little-endian bytes) to torch tensors and back."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence

import torch

from cosserve.server.errors import InvalidArgument, ResourceExhausted
from cosserve.v1 import cosserve_pb2 as pb

__all__ = [
    "TORCH_DTYPES",
    "ChunkAssembler",
    "dtype_name",
    "check_header",
    "tensor_from_wire",
    "tensor_to_wire",
    "tensor_bytes",
]

if sys.byteorder != "little":  # the wire is little-endian and we reinterpret bytes in place
    raise ImportError("cosserve's server needs a little-endian host")

TORCH_DTYPES: dict[int, torch.dtype] = {
    pb.BOOL: torch.bool,
    pb.UINT8: torch.uint8,
    pb.INT8: torch.int8,
    pb.INT16: torch.int16,
    pb.INT32: torch.int32,
    pb.INT64: torch.int64,
    pb.FLOAT16: torch.float16,
    pb.BFLOAT16: torch.bfloat16,
    pb.FLOAT32: torch.float32,
    pb.FLOAT64: torch.float64,
}
WIRE_DTYPES: dict[torch.dtype, int] = {dt: code for code, dt in TORCH_DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_header(what: str, dtype_code: int, shape: Sequence[int], max_bytes: int | None = None) -> int:
    """Validate a tensor header before anything is allocated; return its byte size."""
    if dtype_code not in TORCH_DTYPES:
        raise InvalidArgument(f"{what}: dtype must be one of {', '.join(pb.DType.keys()[1:])}, got code {dtype_code}")
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{what}: shape {tuple(shape)} has a negative dimension")
    nbytes = math.prod(shape) * TORCH_DTYPES[dtype_code].itemsize
    if max_bytes is not None and nbytes > max_bytes:
        raise ResourceExhausted(
            f"{what}: {nbytes} bytes is more than the {max_bytes} a session may hold (--max-session-bytes)"
        )
    return nbytes


def tensor_from_wire(what: str, message: pb.Tensor, device: torch.device) -> torch.Tensor:
    """Decode a wire Tensor onto `device`; InvalidArgument if the bytes do not fit the header."""
    shape = tuple(message.shape)
    nbytes = check_header(what, message.dtype, shape)
    data = message.data
    if len(data) != nbytes:
        raise InvalidArgument(
            f"{what}: data has {len(data)} bytes, but {pb.DType.Name(message.dtype)} {shape} needs {nbytes}"
        )
    dtype = TORCH_DTYPES[message.dtype]
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    # `data` is an immutable bytes object we own; the tensor views it and is never written in place.
    flat = torch.frombuffer(bytearray(data) if device.type != "cpu" else memoryview(data), dtype=torch.uint8)
    tensor = flat.view(dtype).reshape(shape)
    return tensor.to(device, non_blocking=False)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes, C-ordered, in host memory (a view when it is already contiguous on CPU)."""
    host = tensor.detach().to("cpu").contiguous()
    if host.numel() == 0:
        return memoryview(b"")
    return memoryview(host.reshape(-1).view(torch.uint8).numpy())


def tensor_to_wire(tensor: torch.Tensor, out: pb.Tensor) -> pb.Tensor:
    out.dtype = WIRE_DTYPES[tensor.dtype]
    out.shape[:] = tensor.shape
    out.data = tensor_bytes(tensor).tobytes()
    return out


def stream_chunks(tensor: torch.Tensor, chunk_bytes: int) -> Iterator[memoryview]:
    """The tensor's bytes in slices of at most chunk_bytes."""
    data = tensor_bytes(tensor)
    for start in range(0, len(data), chunk_bytes):
        yield data[start : start + chunk_bytes]


class ChunkAssembler:
    """Collects streamed chunks into one preallocated buffer, then becomes a tensor."""

    def __init__(self, what: str, dtype_code: int, shape: Sequence[int], max_bytes: int) -> None:
        self.what = what
        self.shape = tuple(shape)
        self.nbytes = check_header(what, dtype_code, self.shape, max_bytes)
        self.dtype = TORCH_DTYPES[dtype_code]
        self.buffer = torch.empty(self.nbytes, dtype=torch.uint8)
        self.view = self.buffer.numpy()
        self.filled = 0

    def add(self, data: bytes) -> None:
        end = self.filled + len(data)
        if end > self.nbytes:
            raise InvalidArgument(f"{self.what}: more data than the {self.nbytes} bytes of shape {self.shape}")
        self.view[self.filled : end] = memoryview(data)
        self.filled = end

    def finish(self, device: torch.device) -> torch.Tensor:
        if self.filled != self.nbytes:
            raise InvalidArgument(
                f"{self.what}: stream ended after {self.filled} of {self.nbytes} bytes of shape {self.shape}"
            )
        return self.buffer.view(self.dtype).reshape(self.shape).to(device)
