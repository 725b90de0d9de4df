"""Operator implementations; importing this package fills cosserve.server.compute.registry.REGISTRY."""

from cosserve.server.compute.ops import criterion as _criterion  # noqa: F401  (registers)
from cosserve.server.compute.ops import distance as _distance  # noqa: F401  (registers)
from cosserve.server.compute.ops import elementwise as _elementwise  # noqa: F401  (registers)
from cosserve.server.compute.ops import ranking as _ranking  # noqa: F401  (registers)

__all__: list[str] = []
