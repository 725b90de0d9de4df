"""The threads that run work too large for the event loop: a bounded pool, owned by the server."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import TypeVar

__all__ = ["ON_THREAD", "StopSignal", "Stopped", "Workers"]

T = TypeVar("T")

# True in the context of work Workers.run sent to a thread: only such work gets a span of its own
# (engine's op spans); work run inline is small, and its call's span covers it.
ON_THREAD: contextvars.ContextVar[bool] = contextvars.ContextVar("cosserve_on_thread", default=False)


class Stopped(Exception):
    """Raised by work that found its StopSignal set: its caller is gone or its deadline passed."""


class StopSignal:
    """Tells work on a thread, which cannot be interrupted, to stop at its next check: set when
    the awaiting call is cancelled, and due once `timeout_s` (the call's deadline) has passed."""

    def __init__(self, timeout_s: float | None = None) -> None:
        self._event = threading.Event()
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set() or (self._deadline is not None and time.monotonic() >= self._deadline)

    def check(self) -> None:
        if self.is_set():
            raise Stopped("the call was cancelled or its deadline passed")


class Workers:
    """Runs a call on the event loop when its cost is at most `inline_bytes` (a thread hand-off
    would cost more than the work), and on one of `threads` threads otherwise, so that large ops
    never hold up other clients' calls. Threads are started on demand and kept."""

    def __init__(self, threads: int, inline_bytes: int, name: str = "cosserve-work") -> None:
        self.inline_bytes = inline_bytes
        self._pool = futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)

    async def run(self, cost_bytes: float, fn: Callable[..., T], *args: object, stop: StopSignal | None = None) -> T:
        """fn(*args), inline or on a thread by its cost (math.inf: always a thread). A cancelled
        caller stops waiting at once and sets `stop`; work already on a thread runs until it checks
        `stop` (or to its end), and its result is dropped."""
        if cost_bytes <= self.inline_bytes:
            return fn(*args)
        # The call's context goes with its work: log lines on the thread carry its request id.
        context = contextvars.copy_context()
        context.run(ON_THREAD.set, True)
        try:
            # No local holds the future: an exception it carries would otherwise reach this frame
            # through its traceback and make a reference cycle that keeps the call's tensors alive.
            return await asyncio.get_running_loop().run_in_executor(self._pool, context.run, fn, *args)
        except asyncio.CancelledError:
            if stop is not None:
                stop.set()
            raise

    def shutdown(self) -> None:
        """Drop queued work and return at once; calls still running are abandoned, not awaited."""
        self._pool.shutdown(wait=False, cancel_futures=True)
