"""Generated stubs of the Open Inference Protocol (KServe v2 / Triton), package `inference`.

Imported by the server only: tritonclient registers the same protobuf package, and one process
cannot hold both. Regenerate with `python protos/generate.py`."""
