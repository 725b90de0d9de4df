"""Torch tensors as memory the server holds: the dtypes it stores, allocations it refuses when
the machine cannot give them, and a tensor's bytes. Every layer reads it; it knows no wire."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from cosserve.server.errors import ResourceExhausted

__all__ = [
    "FLOAT_DTYPES",
    "STORED_DTYPES",
    "byte_view",
    "dtype_name",
    "empty",
    "is_out_of_memory",
    "refuse_if_out_of_memory",
    "tensor_bytes",
]

# Every dtype a blob may have (protocols/codec.py maps each to the wire's DType of its name).
STORED_DTYPES = (
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
)
# The floating dtypes operators accept (Caffe2: float32 only; the rest is cosserve's extension).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_out_of_memory(err: BaseException) -> bool:
    """Whether torch or Python failed to allocate (CPU allocation failures are plain RuntimeErrors)."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(err, RuntimeError) and "can't allocate memory" in str(err)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def refuse_if_out_of_memory(what: str, err: Exception) -> None:
    """ResourceExhausted if `err` is an allocation the machine refused (a size it cannot hold)."""
    if is_out_of_memory(err):
        raise ResourceExhausted(f"{what}: the server cannot allocate it now ({type(err).__name__}); try a smaller one") from None


def empty(dtype: torch.dtype, shape: Sequence[int], device: torch.device, what: str = "tensor") -> torch.Tensor:
    """An uninitialized tensor; ResourceExhausted if the machine cannot allocate it. Host memory
    comes from numpy, which asks the kernel for huge pages on large arrays: first writes into
    fresh memory fault far less (4x faster here for 1 GiB)."""
    nbytes = math.prod(shape) * dtype.itemsize
    try:
        if device.type != "cpu" or not nbytes:
            return torch.empty(tuple(shape), dtype=dtype, device=device)
        return torch.from_numpy(np.empty(nbytes, np.uint8)).view(dtype).reshape(tuple(shape))
    except Exception as err:
        refuse_if_out_of_memory(what, err)
        raise


def byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, C-ordered, as a flat uint8 tensor on its device (a view when contiguous)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes, C-ordered, in host memory (a view when it is already contiguous on CPU)."""
    host = tensor.detach()
    if host.device.type != "cpu" or not host.is_contiguous():
        host = host.to("cpu").contiguous()
    if host.numel() == 0:
        return memoryview(b"")
    # Through numpy: fewer torch calls than view(uint8), which counts on a server's hot path.
    array = host.view(torch.int16).numpy() if host.dtype is torch.bfloat16 else host.numpy()
    return array.reshape(-1).view(np.uint8).data
