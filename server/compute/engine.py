"""Running operators: validation against the registry, all-or-nothing nets, one-shot compute
and the finite-difference gradient check. No gRPC here."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from cosserve.limits import readable_bytes
from cosserve.server import tracing
from cosserve.server.compute import ops as _ops  # noqa: F401  (fills the registry)
from cosserve.server.compute.registry import REGISTRY, ArgType, InputKind, Operator, lookup
from cosserve.server.compute.workers import ON_THREAD, StopSignal
from cosserve.server.errors import InvalidArgument, NotFound, ResourceExhausted
from cosserve.server.memory import FLOAT_DTYPES, dtype_name, is_out_of_memory
from cosserve.server.state.workspace import Transaction, Workspace, check_name

__all__ = [
    "ACCEPTED_DTYPES",
    "LABEL_DTYPES",
    "OpCall",
    "OpObserver",
    "bind",
    "check_gradient",
    "check_inputs",
    "compute",
    "execute",
    "expected_output_bytes",
    "gradient_check_cost",
    "input_bytes",
    "run_net",
]

LABEL_DTYPES = (torch.int32, torch.int64)
ACCEPTED_DTYPES = {InputKind.FLOAT: FLOAT_DTYPES, InputKind.LABEL: LABEL_DTYPES}

# The finite-difference check evaluates the op twice per floating input element; each evaluation
# reads every input and writes every output, and costs besides about as much as this many
# elements (one op call from Python). Every op with a gradient is elementwise or row-wise, so its
# work is in proportion to those elements.
GRADIENT_CHECK_CALL_ELEMENTS = 10_000
# A check costs evaluations x (input and output elements + GRADIENT_CHECK_CALL_ELEMENTS); this
# bound is a few seconds of one idle core (Cos of 12,000 elements: 8.2e8, about 3 s; Cos of
# 20,000, once allowed, is 2e9 and took 30-140 s on a loaded host).
MAX_GRADIENT_CHECK_COST = 1_000_000_000
# Counts in one request, checked before anything is converted, each far above what any
# cosine-family net needs: one message holds up to 3.5 million empty ops (or arguments, or names),
# and turning that many protobuf objects into Python ones takes microseconds each, on the event
# loop, which a request must not buy (a full message of empty ops held every call for 23.7 s).
MAX_NET_OPS = 10_000
MAX_OP_ARGS = 64
MAX_OP_BLOBS = 64  # inputs, and outputs, of one op (cosserve's take at most 3 and give at most 2)


def check_op_counts(args: int, inputs: int, outputs: int, where: str) -> None:
    """InvalidArgument when one op has more arguments, inputs or outputs than any op takes."""
    for field, count, bound in (("arg", args, MAX_OP_ARGS), ("input", inputs, MAX_OP_BLOBS), ("output", outputs, MAX_OP_BLOBS)):
        if count > bound:
            raise InvalidArgument(f"{where}: {count} {field} entries, more than the {bound} an operator may have")


def check_net_count(ops: int, where: str, field: str = "op") -> None:
    """InvalidArgument when a net has more ops than MAX_NET_OPS."""
    if ops > MAX_NET_OPS:
        raise InvalidArgument(f"{where}: {ops} {field} entries, more than the {MAX_NET_OPS} a net may have")


# Told (op name, device, seconds) after each op runs, e.g. by Metrics.observe_op.
OpObserver = Callable[[str, str, float], None]


@dataclasses.dataclass(frozen=True)
class OpCall:
    """One operator invocation, as the client sent it."""

    type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    args: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def bind(call: OpCall) -> tuple[Operator, dict[str, Any]]:
    """Look the op up and check its input/output counts and arguments; return it with resolved args."""
    op = lookup(call.type)
    schema = op.schema
    expected_inputs = [i.name for i in schema.inputs]
    if len(call.inputs) != len(expected_inputs):
        raise InvalidArgument(
            f"{schema.name} takes {_plural(len(expected_inputs), 'input')} ({', '.join(expected_inputs)}), "
            f"got {len(call.inputs)}: {list(call.inputs)}"
        )
    if len(call.outputs) != len(schema.outputs):
        raise InvalidArgument(
            f"{schema.name} takes {_plural(len(schema.outputs), 'output')} ({', '.join(schema.outputs)}), "
            f"got {len(call.outputs)}: {list(call.outputs)}"
        )
    for name in (*call.inputs, *call.outputs):
        if not name:
            raise InvalidArgument(f"{schema.name}: blob names must not be empty")
    for name in call.outputs:
        try:
            check_name(name)
        except InvalidArgument as err:
            raise InvalidArgument(f"{schema.name}: {err}") from None
    if len(set(call.outputs)) != len(call.outputs):
        raise InvalidArgument(f"{schema.name}: output names must differ, got {list(call.outputs)}")
    resolved = {a.name: a.default for a in schema.args}
    for name, value in call.args.items():
        spec = schema.arg(name)
        if spec is None:
            known = ", ".join(a.name for a in schema.args) or "none"
            raise InvalidArgument(f"{schema.name} has no argument {name!r} (its arguments: {known})")
        resolved[name] = _coerce(schema.name, spec.name, spec.type, value)
    return op, resolved


def _coerce(op: str, name: str, kind: ArgType, value: Any) -> Any:
    ok = {
        ArgType.FLOAT: isinstance(value, (int, float)) and not isinstance(value, bool),
        ArgType.INT: isinstance(value, int) and not isinstance(value, bool),
        # Caffe2 stores a bool as the int 0 or 1 (Argument.i), in its encoding and so in ours.
        ArgType.BOOL: isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)),
        ArgType.STRING: isinstance(value, str),
    }[kind]
    if not ok:
        expected = "bool (or the int 0 or 1)" if kind is ArgType.BOOL else kind.value
        raise InvalidArgument(f"{op}: argument {name!r} must be {expected}, got {type(value).__name__} {value!r}")
    if kind is ArgType.BOOL:
        return bool(value)
    return float(value) if kind is ArgType.FLOAT else value


def check_inputs(op: Operator, names: Sequence[str], inputs: Sequence[torch.Tensor], args: Mapping[str, Any]) -> None:
    """Check input dtypes against the schema (floating inputs share one dtype), then shapes.

    Shape checks leave the op out of their messages; it is named here, with the blobs."""
    schema = op.schema
    float_dtype: tuple[str, torch.dtype] | None = None
    for spec, name, tensor in zip(schema.inputs, names, inputs):
        accepted = ACCEPTED_DTYPES[spec.kind]
        if tensor.dtype not in accepted:
            raise InvalidArgument(
                f"{schema.name}: input {spec.name} (blob {name!r}) must be "
                f"{' or '.join(dtype_name(d) for d in accepted)}, got {dtype_name(tensor.dtype)}"
            )
        if spec.kind is InputKind.FLOAT:
            if float_dtype is None:
                float_dtype = (name, tensor.dtype)
            elif tensor.dtype != float_dtype[1]:
                raise InvalidArgument(
                    f"{schema.name}: input {spec.name} (blob {name!r}) is {dtype_name(tensor.dtype)}, but blob "
                    f"{float_dtype[0]!r} is {dtype_name(float_dtype[1])}; floating inputs must share a dtype"
                )
    try:
        op.check_shapes(inputs, args)
    except InvalidArgument as err:
        blobs = ", ".join(f"{s.name}={n!r} {tuple(t.shape)}" for s, n, t in zip(schema.inputs, names, inputs))
        raise InvalidArgument(f"{schema.name}: {err} (blobs: {blobs})") from None


def _apply(op: Operator, names: Sequence[str], inputs: Sequence[torch.Tensor], args: Mapping[str, Any]) -> list[torch.Tensor]:
    try:
        return list(op.impl(inputs, args))
    except Exception as err:
        if is_out_of_memory(err):
            raise ResourceExhausted(f"{op.schema.name}: out of memory: {err}") from None
        raise


def expected_output_bytes(op: Operator, inputs: Sequence[torch.Tensor], args: Mapping[str, Any]) -> int:
    """The bytes an op's outputs will take, known before it runs: its declared `output_bytes`, or
    else the bytes of its inputs (every op that declares none writes at most what it reads; its
    actual outputs are charged again when staged, so one that wrote more is still refused)."""
    if op.output_bytes is not None:
        return int(op.output_bytes(inputs, args))
    return sum(t.numel() * t.element_size() for t in inputs)


def execute(calls: Sequence[OpCall], txn: Transaction, observe: OpObserver | None = None) -> None:
    """Run `calls` in order, each reading the outputs staged by those before it; stage every output
    in `txn`. Each op's outputs are charged to `txn` before it runs (`expected_output_bytes`), so
    the call that would pass a limit is refused before it allocates."""
    for position, call in enumerate(calls):
        try:
            op, args = bind(call)
            inputs = [txn.get(name) for name in call.inputs]
            check_inputs(op, call.inputs, inputs, args)
            txn.expect(call.outputs, expected_output_bytes(op, inputs, args), op.schema.name)
            started = time.perf_counter()
            outputs = _apply(op, call.inputs, inputs, args)
            if observe is not None:
                device = str(inputs[0].device) if inputs else "cpu"
                observe(op.schema.name, device, time.perf_counter() - started)
            txn.stage_outputs(dict(zip(call.outputs, outputs)), op.schema.name)
        except (InvalidArgument, NotFound, ResourceExhausted) as err:
            if len(calls) == 1:
                raise
            raise type(err)(f"op #{position} ({call.type}): {err}; nothing was changed") from None


# Op types named on a net's span, at most (a net may have MAX_NET_OPS).
_SPAN_OP_TYPES = 16


def _op_span(name: str, calls: Sequence[OpCall]) -> contextlib.AbstractContextManager[tracing.Span]:
    """The span of an op or a net on a Workers thread (thread.name): its op types and count, never
    its tensors. None for one run inline on the loop, which is small: its call's span covers it."""
    if not tracing.enabled() or not ON_THREAD.get():
        return tracing.NO_SPAN
    types = sorted({tracing.text(call.type) for call in calls[:_SPAN_OP_TYPES]})
    return tracing.span(
        name, {"cosserve.op.types": types, "cosserve.op.count": len(calls), "thread.name": threading.current_thread().name}
    )


def input_bytes(workspace: Workspace, calls: Sequence[OpCall]) -> int:
    """Bytes of the stored blobs that `calls` read (outputs of earlier calls not counted): how
    much work a net is, to choose between the event loop and a worker thread."""
    return workspace.size_of(n for call in calls for n in call.inputs)


def run_net(workspace: Workspace, calls: Sequence[OpCall], observe: OpObserver | None = None) -> None:
    """Run operators on a session, all or nothing."""
    with _op_span("cosserve.net", calls), workspace.transaction() as txn:
        execute(calls, txn, observe)
        txn.commit()


def _not_sent(name: str) -> NotFound:
    return NotFound(f"input blob {name!r} was not sent with the call")


def compute(
    call: OpCall, inputs: Mapping[str, torch.Tensor], max_output_bytes: int, observe: OpObserver | None = None
) -> list[torch.Tensor]:
    """Run one operator on tensors given with the call; return its outputs in order.

    The outputs must fit in `max_output_bytes` (one reply message); ops that declare their
    output size are refused before they run.
    """
    # Only the outputs are charged: the reply does not carry the inputs.
    txn = Transaction(dict(inputs), max_output_bytes, _not_sent)
    with _op_span("cosserve.op", [call]):
        execute([call], txn, observe)
    outputs = [txn.staged[name] for name in call.outputs]
    size = Workspace.bytes_of(dict(zip(call.outputs, outputs)))
    if size > max_output_bytes:
        raise ResourceExhausted(
            f"{call.type}: the outputs are {readable_bytes(size)}, more than the {readable_bytes(max_output_bytes)} of one reply; "
            "run it in a session and fetch the outputs (streamed)"
        )
    return outputs


def gradient_check_cost(perturbed: int, elements_per_evaluation: int) -> int:
    """The cost of a finite-difference check, in element visits (see MAX_GRADIENT_CHECK_COST)."""
    return 2 * perturbed * (elements_per_evaluation + GRADIENT_CHECK_CALL_ELEMENTS)


def check_gradient(
    workspace: Workspace, call: OpCall, step_size: float, output_index: int, stop: StopSignal | None = None
) -> list[tuple[str, float, float]]:
    """Compare the gradient op of `call` with central differences, in float64.

    Loss = sum(output[output_index] * G) for a fixed pseudo-random G, so the analytic gradient
    is the gradient op fed with dOutput = G. Returns (input name, max abs, max rel error) per
    floating input. Refused above MAX_GRADIENT_CHECK_COST; between evaluations it checks `stop`
    and raises workers.Stopped once it is set.
    """
    with _op_span("cosserve.gradient_check", [call]):
        return _check_gradient(workspace, call, step_size, output_index, stop)


def _check_gradient(
    workspace: Workspace, call: OpCall, step_size: float, output_index: int, stop: StopSignal | None
) -> list[tuple[str, float, float]]:
    op = REGISTRY.get(call.type)
    if op is not None and not call.outputs:
        call = dataclasses.replace(call, outputs=tuple(f"_out{i}" for i in range(len(op.schema.outputs))))
    op, args = bind(call)
    schema = op.schema
    if schema.gradient is None:
        raise InvalidArgument(f"{schema.name} has no gradient operator to check")
    if not 0 <= output_index < len(schema.outputs):
        raise InvalidArgument(f"{schema.name}: output_index {output_index} is not in [0, {len(schema.outputs)})")
    if not math.isfinite(step_size) or step_size < 0:
        raise InvalidArgument(f"{schema.name}: step_size must be a finite positive number (0: 1e-6), got {step_size}")
    step = step_size if step_size > 0 else 1e-6
    stored = [workspace.get(name) for name in call.inputs]
    check_inputs(op, call.inputs, stored, args)
    inputs = [t.to(torch.float64) if t.dtype in FLOAT_DTYPES else t for t in stored]
    floating = [i for i, spec in enumerate(schema.inputs) if spec.kind is InputKind.FLOAT]
    perturbed = sum(inputs[i].numel() for i in floating)
    first = op.impl(inputs, args)
    per_evaluation = sum(t.numel() for t in inputs) + sum(t.numel() for t in first)
    cost = gradient_check_cost(perturbed, per_evaluation)
    if cost > MAX_GRADIENT_CHECK_COST:
        raise ResourceExhausted(
            f"{schema.name}: checking {perturbed} input elements takes {2 * perturbed} evaluations of "
            f"{per_evaluation} elements each, a cost of {cost}, above the {MAX_GRADIENT_CHECK_COST} a check may "
            "have (2 x perturbed elements x (elements per evaluation + "
            f"{GRADIENT_CHECK_CALL_ELEMENTS})); check a smaller sample"
        )
    output = first[output_index]
    del first
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(output.shape, generator=generator, dtype=torch.float64).to(output.device)
    grad_op = REGISTRY[schema.gradient]
    grad_inputs = [*inputs, weights]
    analytic = list(grad_op.impl(grad_inputs, args))

    def loss(values: list[torch.Tensor]) -> float:
        if stop is not None:
            stop.check()  # the thread is free again within one evaluation of a cancel or deadline
        return float((op.impl(values, args)[output_index] * weights).sum())

    results = []
    for slot, i in enumerate(floating):
        base = inputs[i].clone()
        numeric = torch.zeros_like(base).reshape(-1)
        flat = base.reshape(-1)
        for j in range(flat.numel()):
            original = flat[j].item()
            flat[j] = original + step
            plus = loss([*inputs[:i], base, *inputs[i + 1 :]])
            flat[j] = original - step
            minus = loss([*inputs[:i], base, *inputs[i + 1 :]])
            flat[j] = original
            numeric[j] = (plus - minus) / (2 * step)
        diff = (analytic[slot].reshape(-1).to(torch.float64) - numeric).abs()
        abs_err = float(diff.max()) if diff.numel() else 0.0
        rel_err = float((diff / numeric.abs().clamp(min=1.0)).max()) if diff.numel() else 0.0
        results.append((call.inputs[i], abs_err, rel_err))
    return results
