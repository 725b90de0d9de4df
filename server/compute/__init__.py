"""Compute: the operator registry and its torch implementations, the engine that runs them on a
workspace all-or-nothing, exact similarity and top-k, and the threads that run work off the event loop."""
