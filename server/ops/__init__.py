"""Operator implementations; importing this package fills cosserve.server.registry.REGISTRY."""

from cosserve.server.ops import elementwise as _elementwise  # noqa: F401  (registers)
from cosserve.server.ops import distance as _distance  # noqa: F401  (registers)
from cosserve.server.ops import criterion as _criterion  # noqa: F401  (registers)
from cosserve.server.ops import ranking as _ranking  # noqa: F401  (registers)

__all__: list[str] = []
