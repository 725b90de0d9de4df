"""cosserve: Caffe2's cosine operators as a gRPC service on torch; this package is the client (no
torch; only the `cosserve` command, cosserve.cli, reaches into cosserve.server)."""

from cosserve.calls import GradientCheck, RangeResult
from cosserve.client import Client, Session
from cosserve.errors import (
    ClientClosedError,
    CosserveError,
    CosserveRpcError,
    InvalidArgumentError,
    InvalidTypeError,
    OpSpecError,
    ProtocolError,
    ShapeError,
    SharedMemoryError,
    UnsupportedDtypeError,
)
from cosserve.sharded import ShardedScorer

__all__ = [
    "Client",
    "ClientClosedError",
    "CosserveError",
    "CosserveRpcError",
    "GradientCheck",
    "InvalidArgumentError",
    "InvalidTypeError",
    "OpSpecError",
    "ProtocolError",
    "RangeResult",
    "Session",
    "ShapeError",
    "ShardedScorer",
    "SharedMemoryError",
    "UnsupportedDtypeError",
    "__version__",
]
__version__ = "0.1.0"
