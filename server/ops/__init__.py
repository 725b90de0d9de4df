"""Operator implementations; importing this package fills cosserve.server.registry.REGISTRY."""

from cosserve.server.ops import elementwise as _elementwise  # noqa: F401  (registers)

__all__: list[str] = []
