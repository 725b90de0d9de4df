"""Protocols: the encodings a request arrives in (cosserve.v1's wire tensors, the Open Inference
Protocol, Caffe2's OperatorDef/NetDef, shared-memory regions) turned into tensors and engine calls, and
back. Bytes in, domain objects out; no grpc."""
