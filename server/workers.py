"""The threads that run work too large for the event loop: a bounded pool, owned by the server."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent import futures
from typing import TypeVar

__all__ = ["Workers"]

T = TypeVar("T")


class Workers:
    """Runs a call on the event loop when its cost is at most `inline_bytes` (a thread hand-off
    would cost more than the work), and on one of `threads` threads otherwise, so that large ops
    never hold up other clients' calls. Threads are started on demand and kept."""

    def __init__(self, threads: int, inline_bytes: int, name: str = "cosserve-work") -> None:
        self.inline_bytes = inline_bytes
        self._pool = futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)

    async def run(self, cost_bytes: int, fn: Callable[..., T], *args: object) -> T:
        """fn(*args), inline or on a thread by its cost. A cancelled caller stops waiting at once;
        work already on a thread runs to its end and its result is dropped."""
        if cost_bytes <= self.inline_bytes:
            return fn(*args)
        # No local holds the future: an exception it carries would otherwise reach this frame
        # through its traceback and make a reference cycle that keeps the call's tensors alive.
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def shutdown(self) -> None:
        """Drop queued work and return at once; calls still running are abandoned, not awaited."""
        self._pool.shutdown(wait=False, cancel_futures=True)
