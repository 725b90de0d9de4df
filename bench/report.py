"""Bench results: one row per measured quantity, the table, the machine, and the JSON."""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
from collections.abc import Sequence
from typing import Any

__all__ = ["Row", "floor_comparison", "machine", "median", "table"]


@dataclasses.dataclass
class Row:
    """One measured quantity: cosserve, its bare-grpcio floors and in-process torch (medians)."""

    workload: str
    metric: str
    unit: str
    cosserve: float
    # Bare grpcio servers moving the same bytes in the same process layout, by kind
    # (bench.floor.KINDS: "threaded", "aio"); cosserve is compared with the faster one.
    floors: dict[str, float] = dataclasses.field(default_factory=dict)
    torch: float | None = None  # the math (or the copy) in-process
    lower_is_better: bool = False  # latencies; rates are better higher
    ratio: float | None = None
    ratio_of: str = ""  # what the ratio divides, e.g. "cosserve/floor(aio)"
    target: str = ""  # e.g. "<= 1.15"
    met: bool | None = None
    samples: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # per repeat

    def check(self, ratio: float, ratio_of: str, op: str, bound: float) -> Row:
        self.ratio, self.ratio_of, self.target = ratio, ratio_of, f"{op} {bound:g}"
        self.met = ratio <= bound if op == "<=" else ratio >= bound
        return self

    def faster_floor(self) -> str:
        """The kind of floor that did better here: the lower latency, or the higher rate."""
        pick = min if self.lower_is_better else max
        return pick(self.floors, key=self.floors.__getitem__)

    def against_floor(self, op: str = "", bound: float = 0.0) -> Row:
        """The ratio to the faster floor; checked against `op bound` when an op is given."""
        kind = self.faster_floor()
        ratio, ratio_of = self.cosserve / self.floors[kind], f"cosserve/floor({kind})"
        if op:
            return self.check(ratio, ratio_of, op, bound)
        self.ratio, self.ratio_of = ratio, ratio_of
        return self


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 0.1:
        return f"{value:.2f}"
    return f"{value:.2g}"  # e.g. a CPU's TFLOP/s


def _grid(head: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |" for row in body]
    return "\n".join(lines)


def _floor_kinds(rows: Sequence[Row]) -> list[str]:
    return list(dict.fromkeys(kind for r in rows for kind in r.floors))


def table(rows: Sequence[Row]) -> str:
    """A plain-text table (also valid Markdown): one column per kind of floor."""
    kinds = _floor_kinds(rows)
    head = ["workload", "metric", "unit", "cosserve", *(f"floor {k}" for k in kinds), "torch in-proc",
            "ratio", "of", "target", "met"]  # fmt: skip
    body = [
        [
            r.workload, r.metric, r.unit, _fmt(r.cosserve), *(_fmt(r.floors.get(k)) for k in kinds), _fmt(r.torch),
            "-" if r.ratio is None else f"{r.ratio:.2f}", r.ratio_of or "-", r.target or "-",
            "-" if r.met is None else ("yes" if r.met else "NO"),
        ]
        for r in rows
    ]  # fmt: skip
    return _grid(head, body)


def floor_comparison(rows: Sequence[Row], kind: str = "aio", base: str = "threaded") -> str:
    """How one floor compares with the other on every row that has both (a Markdown table)."""
    both = [r for r in rows if kind in r.floors and base in r.floors]
    if not both:
        return ""
    body = []
    for r in both:
        ratio = r.floors[kind] / r.floors[base]
        worse = ratio > 1 if r.lower_is_better else ratio < 1
        verdict = f"{kind} {'slower' if worse else 'faster'} by {abs(ratio - 1):.0%}"
        body.append([r.workload, r.metric, r.unit, _fmt(r.floors[base]), _fmt(r.floors[kind]), f"{ratio:.2f}", verdict])
    head = ["workload", "metric", "unit", f"floor {base}", f"floor {kind}", f"{kind}/{base}", "so"]
    legend = (
        f"Floors compared: {kind}/{base} of each figure; slower (faster) by x% is x% more (less) time "
        "for a latency, x% less (more) for a rate."
    )
    return legend + "\n\n" + _grid(head, body)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import google.protobuf
    import grpc
    import numpy
    import torch

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    ram = 0
    try:
        import psutil

        ram = psutil.virtual_memory().total
    except ImportError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": round(ram / 2**30, 1),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # Other work on the machine while the bench ran (1, 5, 15 minutes): numbers taken on a
        # loaded machine are slower and noisier, the floor's as well as cosserve's.
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
