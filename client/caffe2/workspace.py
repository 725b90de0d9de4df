"""Caffe2's `workspace` on a remote cosserve server: FeedBlob, FetchBlob, RunOperatorOnce, RunNetOnce,
SwitchWorkspace and the rest, with Caffe2's signatures and return values.

Point it at a server with `connect("host:port", ...)`, or set COSSERVE_ADDRESS. Each Caffe2
workspace name ("default" first) is one cosserve session, opened on first use; the server's
errors raise RuntimeError with its message, as Caffe2's enforce failures do (the CosserveRpcError,
with its status code, is the exception's __cause__). Operators and nets travel in Caffe2's own
encoding: RunOperatorOnce sends the serialized OperatorDef as RunOperatorRequest.caffe2_op and
RunNetOnce the NetDef as RunNetRequest.caffe2_net.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from google.protobuf.message import Message

from cosserve.caffe2 import caffe2_pb2
from cosserve.client import Client, Session
from cosserve.errors import CosserveRpcError

__all__ = [
    "ADDRESS_VARIABLE",
    "Blobs",
    "CurrentWorkspace",
    "FeedBlob",
    "FetchBlob",
    "FetchBlobs",
    "GpuDeviceType",
    "HasBlob",
    "RemoveBlob",
    "ResetWorkspace",
    "RunNetOnce",
    "RunOperatorOnce",
    "RunOperatorsOnce",
    "SwitchWorkspace",
    "Workspaces",
    "close",
    "connect",
]

# The server's "host:port" when connect() was not called.
ADDRESS_VARIABLE = "COSSERVE_ADDRESS"
GpuDeviceType = caffe2_pb2.CUDA
_DEFAULT = "default"


class _Workspaces:
    """The module's state. Caffe2's workspace API is module-level functions over one process-wide
    set of workspaces, so this one object holds the client and a session per workspace name."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.client: Client | None = None
        self.device = "cpu"
        # Workspace name -> its session, None until first used; in creation order, "default" first.
        self.sessions: dict[str, Session | None] = {_DEFAULT: None}
        self.current = _DEFAULT

    def session(self) -> Session:
        """The current workspace's session, opened on first use."""
        with self.lock:
            if self.client is None:
                address = os.environ.get(ADDRESS_VARIABLE)
                if not address:
                    raise RuntimeError(
                        f"cosserve.caffe2 is not connected: call workspace.connect('host:port') or set {ADDRESS_VARIABLE}"
                    )
                self.client = Client(address)
            session = self.sessions[self.current]
            if session is None:
                with _as_runtime_error():
                    session = self.client.session(self.device)
                self.sessions[self.current] = session
            return session

    def close(self) -> None:
        with self.lock:
            sessions = [s for s in self.sessions.values() if s is not None]
            client, self.client = self.client, None
            self.sessions = {_DEFAULT: None}
            self.current = _DEFAULT
        for session in sessions:
            with contextlib.suppress(CosserveRpcError):  # one the server expired, or a server gone
                session.close()
        if client is not None:
            client.close()


_state = _Workspaces()


@contextlib.contextmanager
def _as_runtime_error() -> Iterator[None]:
    """The server's refusals as Caffe2 raises its own: RuntimeError with the message."""
    try:
        yield
    except CosserveRpcError as err:
        raise RuntimeError(err.details()) from err


def connect(address: str | None = None, *, device: str = "cpu", **client_options: Any) -> None:
    """Use the cosserve server at `address` ("host:port"; None: $COSSERVE_ADDRESS) from now on.

    `device` is where each workspace's blobs live ("cpu", as Caffe2's default; "cuda", "cuda:N",
    "auto"); `client_options` go to cosserve.Client (timeout, token, tls, root_certificates,
    client_cert, client_key, credentials). Workspaces of an earlier connection are closed.
    """
    address = address or os.environ.get(ADDRESS_VARIABLE)
    if not address:
        raise ValueError(f"connect needs an address ('host:port') or {ADDRESS_VARIABLE}")
    close()
    client = Client(address, **client_options)
    with _state.lock:
        _state.client = client
        _state.device = device


def close() -> None:
    """Close every workspace's session and the connection (cosserve's addition: the server frees
    the blobs now, not when the sessions expire)."""
    _state.close()


def _name(name: Any) -> str:
    return name if isinstance(name, str) else str(name)  # a BlobReference is its name


def _device_of(option: caffe2_pb2.DeviceOption) -> str:
    if option.device_type == caffe2_pb2.CPU:
        return "cpu"
    if option.device_type == caffe2_pb2.CUDA:
        return f"cuda:{option.device_id}"
    raise RuntimeError(f"device_type {option.device_type} is not served; caffe2_pb2.CPU (0) or caffe2_pb2.CUDA (1)")


def FeedBlob(name: Any, arr: Any, device_option: caffe2_pb2.DeviceOption | None = None) -> bool:
    """Create or overwrite blob `name` in the current workspace with an array; returns True.
    A device_option must name the workspace's device (see connect)."""
    session = _state.session()
    if device_option is not None and _device_of(device_option) != session.device:
        raise RuntimeError(
            f"FeedBlob: device_option names {_device_of(device_option)} but workspace {_state.current!r} holds "
            f"its blobs on {session.device}; connect(..., device=...) chooses it"
        )
    with _as_runtime_error():
        session.feed_blob(_name(name), arr)
    return True


def FetchBlob(name: Any) -> np.ndarray:
    """The blob `name` of the current workspace, as a numpy array."""
    session = _state.session()
    with _as_runtime_error():
        return session.fetch_blob(_name(name))


def FetchBlobs(names: Iterable[Any]) -> list[np.ndarray]:
    """The blobs `names`, in order."""
    return [FetchBlob(name) for name in names]


def HasBlob(name: Any) -> bool:
    session = _state.session()
    with _as_runtime_error():
        return session.has_blob(_name(name))


def Blobs() -> list[str]:
    """The names of the current workspace's blobs, sorted."""
    session = _state.session()
    with _as_runtime_error():
        return session.blobs()


def RemoveBlob(name: Any) -> bool:
    """Drop blob `name` from the current workspace; returns True (RuntimeError if it is not there)."""
    session = _state.session()
    with _as_runtime_error():
        session.remove_blob(_name(name))
    return True


def ResetWorkspace(root_folder: str | None = None) -> bool:
    """Drop every blob of the current workspace; returns True. (`root_folder` is Caffe2's folder
    for files its operators write; cosserve's operators write none.)"""
    del root_folder
    session = _state.session()
    with _as_runtime_error():
        session.reset()
    return True


def SwitchWorkspace(workspace_name: str, create_if_missing: bool | None = False) -> None:
    """Make `workspace_name` the current workspace; an unknown name raises RuntimeError unless
    `create_if_missing` (as in Caffe2)."""
    with _state.lock:
        if workspace_name not in _state.sessions:
            if not create_if_missing:
                raise RuntimeError(
                    f"workspace {workspace_name!r} does not exist; SwitchWorkspace({workspace_name!r}, True) creates it"
                )
            _state.sessions[workspace_name] = None
        _state.current = workspace_name


def CurrentWorkspace() -> str:
    return _state.current


def Workspaces() -> list[str]:
    """Every workspace name, in creation order ("default" first)."""
    return list(_state.sessions)


def _serialized(proto: Any, kind: type) -> bytes:
    """Caffe2's StringifyProto: bytes as they are, a protobuf message serialized, an object with
    Proto() (core.Net) its proto serialized. Any message of Caffe2's wire format will do, real
    Caffe2's caffe2_pb2 included."""
    if isinstance(proto, bytes):
        return proto
    if isinstance(proto, Message):
        return bytes(proto.SerializeToString())
    if hasattr(proto, "Proto"):
        return bytes(proto.Proto().SerializeToString())
    raise TypeError(f"expected a {kind.__name__}, its serialized bytes or a core.Net, got {type(proto).__name__}")


def RunOperatorOnce(operator: Any) -> bool:
    """Run one operator (an OperatorDef from core.CreateOperator, or its bytes) on the current
    workspace; returns True, or raises RuntimeError and changes nothing."""
    data = _serialized(operator, caffe2_pb2.OperatorDef)
    with _as_runtime_error():
        _state.session().run_caffe2_operator(data)
    return True


def RunOperatorsOnce(operators: Iterable[Any]) -> bool:
    """Run operators one by one (each its own call, as in Caffe2); returns True."""
    for operator in operators:
        RunOperatorOnce(operator)
    return True


def RunNetOnce(net: Any) -> bool:
    """Run a net (a NetDef, a core.Net or the NetDef's bytes) on the current workspace, all or
    nothing; returns True."""
    data = _serialized(net, caffe2_pb2.NetDef)
    with _as_runtime_error():
        _state.session().run_caffe2_net(data)
    return True
