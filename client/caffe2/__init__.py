"""Caffe2's Python front door on a remote cosserve server: `from cosserve.caffe2 import core, workspace`.

`caffe2_pb2` holds Caffe2's own protobufs (OperatorDef, NetDef, Argument, DeviceOption, generated
from protos/cosserve/caffe2/caffe2.proto), which `core` builds and `workspace` sends unchanged.
The submodules are imported on use: the server imports `caffe2_pb2` alone.
"""

__all__ = ["caffe2_pb2", "core", "workspace"]
