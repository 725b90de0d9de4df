"""Flows: an operation as a generator that yields the steps it needs (a call, a read of its open
reply stream, a result for its caller) and returns its result, and `Run`, which a shell drives to
perform one. The sync and the asyncio client drive the same flows (cosserve.calls) alike."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Generator, Iterator
from types import TracebackType
from typing import Any, Generic, TypeAlias, TypeVar

import grpc

from cosserve.errors import CosserveError, CosserveRpcError, InvalidArgumentError, InvalidTypeError

__all__ = ["END", "READ", "Answer", "Call", "Emit", "Flow", "Read", "Run", "Step", "grpc_raised", "idle_error", "one", "rpc_error"]

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Call:
    """A step asking the shell to make one RPC and send its reply back into the flow.

    A `stream` call's reply is a stream of messages: the shell answers the call with None, holds
    the stream open and answers each READ with its next message, END after the last. A flow has
    one stream open at a time: opening another, or the flow's end, cancels it (a no-op once it
    ended; it stops a stream the flow left early)."""

    method: str  # the Cosserve RPC's name
    request: Any  # its request message, framed bytes, or an iterator of either for a request stream
    session: str | None = None  # the session it is for: sent as cosserve-session-id metadata too
    timeout: float | None = None  # its deadline in seconds; None: the client's timeout
    framed: bool = False  # the bytes variant of a wire.FRAMED_METHODS method
    stream: bool = False
    # A reply stream no deadline could suit (a blob of any size) has none: it is cancelled, as
    # DEADLINE_EXCEEDED, once no message arrives for `idle` seconds.
    idle: float | None = None
    about: str = ""  # what the call carries, for that error's message: "blob 'X'"


@dataclasses.dataclass(frozen=True)
class Read:
    """A step asking for the next message of the flow's open reply stream (END after the last)."""


READ = Read()


class _End:
    def __repr__(self) -> str:
        return "END"


# What a READ receives once the open stream has no more messages.
END: Any = _End()


@dataclasses.dataclass(frozen=True)
class Emit:
    """A step handing `value` to the caller of an iterating method (`iter_top_k`); answered with None."""

    value: Any


Step: TypeAlias = Call | Read | Emit
# An operation: a generator that yields the steps it needs, receives their answers through
# send() (the shell's error through throw()) and returns the operation's result.
Flow: TypeAlias = Generator[Step, Any, T]


class Run(Generic[T]):
    """A flow as a shell performs it: iterate for its steps, answer each inside `answer()`.

        for step in run:
            with run.answer() as answer:
                answer.reply = <the reply to step>

    An exception raised inside the `with` goes into the flow instead of up (grpc's error as the
    client's, see `_seen`): the flow may catch it (a fallback) or clean up, which can take more
    calls, and raise. The loop ends when the flow returns `result`; what it raises leaves the
    `with`. Everything a shell's own I/O raises goes in, KeyboardInterrupt, asyncio's
    cancellation and the caller's leaving an iterator (GeneratorExit, seen as _CallerLeft)
    included, so that a flow's `finally` still closes what it opened on the server."""

    _result: T

    def __init__(self, flow: Flow[T]) -> None:
        self._flow = flow
        self.step: Step = READ  # replaced by the flow's first step when the iteration starts
        self.done = False
        self._stream: Call | None = None  # the call of the open reply stream
        self._expired: Call | None = None  # a stream the shell cancelled after its idle time

    def __iter__(self) -> Iterator[Step]:
        self._resume(self._flow.send, None)
        while not self.done:
            yield self.step

    def answer(self) -> Answer:
        return Answer(self)

    def expire(self, call: Call) -> None:
        """The shell's word, from any thread, that it cancelled `call`'s stream after its idle time."""
        self._expired = call

    @property
    def result(self) -> T:
        assert self.done, "the flow has not returned"
        return self._result

    def _reply(self, reply: Any) -> None:
        if isinstance(self.step, Call) and self.step.stream:
            self._stream = self.step
        self._resume(self._flow.send, reply)

    def _fail(self, error: BaseException) -> None:
        self._resume(self._flow.throw, self._seen(error))

    def _seen(self, error: BaseException) -> BaseException:
        """What the flow sees of what answering its step raised: grpc's error as the client's (the
        one place that turns one into the other), what grpc raised itself before sending (a
        closed channel's ValueError, a TypeError of a bad timeout) as the client's too, and a read
        cut short by its stream's idle time (the sync shell's watchdog, asyncio.wait_for's
        TimeoutError) as DEADLINE_EXCEEDED."""
        if isinstance(error, GeneratorExit):
            return _CallerLeft()
        call = self._stream if isinstance(self.step, Read) else self.step
        if not isinstance(call, Call):
            return error
        idle = call is self._stream and call.idle is not None
        if idle and (self._expired is call or isinstance(error, TimeoutError)):
            return idle_error(call, error)
        if isinstance(error, grpc.RpcError):
            return rpc_error(error, call.method)
        if isinstance(error, Exception) and not isinstance(error, CosserveError) and _raised_by_grpc(error):
            return grpc_raised(error, call.method)
        return error

    def _resume(self, resume: Callable[[Any], Step], value: Any) -> None:
        try:
            self.step = resume(value)
        except StopIteration as stop:
            self.done = True
            self._result = stop.value
        except _CallerLeft:  # the flow has cleaned up after its caller: the shell's iterator ends
            raise GeneratorExit from None


class _CallerLeft(BaseException):
    """What a flow sees of its caller leaving an iterator early (GeneratorExit in the shell): its
    cleanup may make calls, which GeneratorExit itself forbids once it has gone through a
    `yield from` (that closes the subflow instead of raising in it)."""


class Answer:
    """A shell's answer to the current step of a Run: set `reply`, or raise (see `Run`)."""

    def __init__(self, run: Run[Any]) -> None:
        self._run = run
        self.reply: Any = None

    def __enter__(self) -> Answer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> bool:
        if error is None:
            self._run._reply(self.reply)
        else:
            self._run._fail(error)
        return True  # the flow took the error: it went on to a next step, or raised out of _fail


# What UNAVAILABLE (nothing answered at the address, or it is stopping) asks of the caller.
UNAVAILABLE_ADVICE = (
    "Is a cosserve server (`cosserve serve`) running at that address? The address is host:port, such as 127.0.0.1:50051"
)


def rpc_error(err: grpc.RpcError, method: str) -> CosserveRpcError:
    """The client's error for grpc's, chained to it as `raise ... from err` would; UNAVAILABLE's
    details say what to check."""
    details = err.details() or ""
    if err.code() == grpc.StatusCode.UNAVAILABLE:
        details = f"{details.rstrip('.')}. {UNAVAILABLE_ADVICE}"
    error = CosserveRpcError(err.code(), details, method)
    error.__cause__ = err
    return error


def grpc_raised(err: Exception, method: str) -> CosserveError:
    """The client's error for one grpc raised itself before sending anything (not an RpcError):
    a TypeError as InvalidTypeError, a ValueError as InvalidArgumentError, anything else (grpc.aio's
    UsageError) as CosserveError; chained to it."""
    kind = InvalidTypeError if isinstance(err, TypeError) else InvalidArgumentError if isinstance(err, ValueError) else CosserveError
    error = kind(f"{method}: grpc refused the call before sending it: {err}")
    error.__cause__ = err
    return error


def _raised_by_grpc(error: BaseException) -> bool:
    """Whether grpc raised `error` itself: an exception of its own, or one raised in its code."""
    if type(error).__module__.partition(".")[0] == "grpc":
        return True
    innermost = error.__traceback__
    while innermost is not None and innermost.tb_next is not None:
        innermost = innermost.tb_next
    return innermost is not None and str(innermost.tb_frame.f_globals.get("__name__", "")).partition(".")[0] == "grpc"


def idle_error(call: Call, cause: BaseException) -> CosserveRpcError:
    details = f"no data of {call.about} arrived for {call.idle:g} s (the client's timeout); the call was cancelled"
    error = CosserveRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, details, call.method)
    error.__cause__ = cause
    return error


def one(call: Call) -> Flow[Any]:
    """The flow of a single call: its reply."""
    return (yield call)
