"""Compute: every operator against its reference, Cos, exact scoring and top-k, the core without a server."""
