"""The inverse row norms of corpus tensors, cached for every session that scores against them."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["NormCache"]


class NormCache:
    """Inverse row norms of corpus tensors, keyed weakly by tensor identity. The scoring code
    computes them (compute.similarity.inverse_norms); the state that holds the corpus keeps them.

    Workspace blobs are replaced, never mutated in place, so an entry stays right for as long as
    its tensor lives and goes with it when the blob is overwritten or removed. The tensor's
    version counter is checked too, so even an in-place change could not serve stale norms.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get(self, corpus: torch.Tensor, inverse_norms: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The cached norms of `corpus`, or `inverse_norms(corpus)`, computed now and kept."""
        with self._lock:
            entry = self._entries.get(corpus)
        if entry is not None and entry[0] == corpus._version:
            return entry[1]
        norms = inverse_norms(corpus)  # outside the lock: a large corpus takes a while
        with self._lock:
            self._entries[corpus] = (corpus._version, norms)
        return norms
