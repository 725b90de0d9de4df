"""The cosserve server (needs torch), in layers that import only downward (docs/architecture.md):
edge (grpc) > protocols (wire encodings to core calls) > compute (ops, scoring, threads) > state
(sessions, blobs, disk) > memory and settings > errors. pyproject.toml's import contracts enforce it."""
