"""Tensor codec between numpy arrays (torch tensors accepted) and the wire `Tensor` message."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence
from typing import Any, cast

import ml_dtypes
import numpy as np

from cosserve.errors import ProtocolError, ShapeError, UnsupportedDtypeError
from cosserve.v1 import cosserve_pb2 as pb

__all__ = [
    "NUMPY_DTYPES",
    "as_numpy",
    "array_at",
    "byte_view",
    "chunks",
    "from_wire",
    "nbytes_of",
    "to_wire",
]

# Wire dtype enum -> numpy dtype (little-endian); bfloat16 comes from ml_dtypes.
NUMPY_DTYPES: dict[int, np.dtype] = {
    pb.BOOL: np.dtype(np.bool_),
    pb.UINT8: np.dtype("<u1"),
    pb.INT8: np.dtype("<i1"),
    pb.INT16: np.dtype("<i2"),
    pb.INT32: np.dtype("<i4"),
    pb.INT64: np.dtype("<i8"),
    pb.FLOAT16: np.dtype("<f2"),
    pb.BFLOAT16: np.dtype(ml_dtypes.bfloat16),
    pb.FLOAT32: np.dtype("<f4"),
    pb.FLOAT64: np.dtype("<f8"),
}
# The enum's values as the message fields' type (the stubs type them pb.DType, a subclass of int).
_WIRE_DTYPES: dict[np.dtype, pb.DType] = {dt: cast(pb.DType, code) for code, dt in NUMPY_DTYPES.items()}


def as_numpy(value: Any) -> np.ndarray:
    """Return `value` (numpy array, torch tensor, or array-like) as a C-ordered little-endian array."""
    if type(value).__module__.startswith("torch"):
        value = _torch_to_numpy(value)
    try:
        array = np.asarray(value)
    except ValueError as err:  # a ragged nested list: numpy's "inhomogeneous shape"
        raise ShapeError(f"not an array of one shape: {err}") from None
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    if array.dtype not in _WIRE_DTYPES:
        supported = ", ".join(sorted(str(d) for d in _WIRE_DTYPES))
        raise UnsupportedDtypeError(f"dtype {array.dtype} is not supported; use one of {supported}")
    # Not np.ascontiguousarray: it turns a 0-D array into shape (1,).
    return array if array.flags.c_contiguous else array.copy(order="C")


def _torch_to_numpy(tensor: Any) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if str(tensor.dtype) == "torch.bfloat16":
        # numpy has no bfloat16: reinterpret the bits (int16 view keeps shape and strides). The
        # caller holds a torch tensor, so torch is loaded; the client never imports it itself.
        int16 = sys.modules["torch"].int16
        return tensor.view(int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def wire_dtype(dtype: np.dtype) -> pb.DType:
    return _WIRE_DTYPES[np.dtype(dtype)]


def nbytes_of(dtype_code: int, shape: Sequence[int]) -> int:
    """Byte size of a tensor the server described; ProtocolError for an unknown dtype or a
    negative dimension (a reply this client cannot decode)."""
    if dtype_code not in NUMPY_DTYPES:
        raise ProtocolError(f"the server sent an unknown dtype code {dtype_code}")
    if any(d < 0 for d in shape):
        raise ProtocolError(f"the server sent shape {tuple(shape)}, which has a negative dimension")
    return math.prod(shape) * NUMPY_DTYPES[dtype_code].itemsize


def to_wire(value: Any, out: pb.Tensor | None = None) -> pb.Tensor:
    """Encode an array (or tensor) as a wire Tensor (into `out` when given)."""
    array = as_numpy(value)
    message = pb.Tensor() if out is None else out
    message.dtype = wire_dtype(array.dtype)
    message.shape[:] = array.shape
    message.data = array.tobytes()
    return message


def from_wire(message: pb.Tensor) -> np.ndarray:
    """Decode a wire Tensor into a writable numpy array (ProtocolError if the byte length is wrong)."""
    # A copy: a view of the message's immutable bytes would be read-only, a trap for callers.
    return decode(message.dtype, message.shape, message.data).copy()


def decode(dtype_code: int, shape: Sequence[int], data: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    expected = nbytes_of(dtype_code, shape)
    if len(data) != expected:
        raise ProtocolError(f"tensor data has {len(data)} bytes, shape {tuple(shape)} needs {expected}")
    return np.frombuffer(data, dtype=NUMPY_DTYPES[dtype_code]).reshape(tuple(shape))


def byte_view(array: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, as a view (no copy)."""
    return array.reshape(-1).view(np.uint8).data


def chunks(array: np.ndarray, chunk_bytes: int) -> Iterator[memoryview]:
    """Yield the array's bytes in slices of at most chunk_bytes (none for a zero-size array)."""
    view = byte_view(array)
    for start in range(0, len(view), chunk_bytes):
        yield view[start : start + chunk_bytes]


def array_at(dtype_code: int, shape: Sequence[int], buffer: bytes, start: int, end: int) -> np.ndarray:
    """The array whose bytes are buffer[start:end], as a read-only view (ProtocolError if the size is wrong).

    Callers that hand the array to users copy it (see Session.fetch_blob).
    """
    expected = nbytes_of(dtype_code, shape)
    if end - start != expected:
        raise ProtocolError(f"tensor data has {end - start} bytes, shape {tuple(shape)} needs {expected}")
    dtype = NUMPY_DTYPES[dtype_code]
    if not expected:
        return np.frombuffer(b"", dtype=dtype).reshape(tuple(shape))
    return np.frombuffer(buffer, dtype=dtype, count=expected // dtype.itemsize, offset=start).reshape(tuple(shape))
