"""cosserve: Caffe2's cosine operators as a gRPC service; this package is the client (no torch)."""

from cosserve.client import Client, Session
from cosserve.errors import CosserveRpcError

__all__ = ["Client", "CosserveRpcError", "Session", "__version__"]
__version__ = "0.1.0"
