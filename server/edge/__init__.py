"""The edge: the only layer that imports grpc. It builds and runs the server, authenticates and
counts calls, turns messages into core calls (the servicers) and domain errors into status codes."""
