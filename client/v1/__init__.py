"""Generated protobuf and gRPC stubs of the cosserve.v1 contract (see protos/generate.py)."""
