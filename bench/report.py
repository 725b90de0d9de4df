"""Bench results: one row per measured quantity, the table, the machine, and the JSON."""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
from collections.abc import Sequence
from typing import Any

__all__ = ["Row", "machine", "median", "table"]


@dataclasses.dataclass
class Row:
    """One measured quantity: cosserve, its bare-grpcio floor and in-process torch (medians)."""

    workload: str
    metric: str
    unit: str
    cosserve: float
    floor: float | None = None  # bare grpcio server, same process layout and bytes
    torch: float | None = None  # the math (or the copy) in-process
    ratio: float | None = None
    ratio_of: str = ""  # what the ratio divides, e.g. "cosserve/floor"
    target: str = ""  # e.g. "<= 1.15"
    met: bool | None = None
    samples: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # per repeat

    def check(self, ratio: float, ratio_of: str, op: str, bound: float) -> Row:
        self.ratio, self.ratio_of, self.target = ratio, ratio_of, f"{op} {bound:g}"
        self.met = ratio <= bound if op == "<=" else ratio >= bound
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
    return f"{value:.2f}"


def table(rows: Sequence[Row]) -> str:
    """A plain-text table (also valid Markdown)."""
    head = ["workload", "metric", "unit", "cosserve", "grpcio floor", "torch in-proc", "ratio", "of", "target", "met"]
    body = [
        [
            r.workload, r.metric, r.unit, _fmt(r.cosserve), _fmt(r.floor), _fmt(r.torch),
            "-" if r.ratio is None else f"{r.ratio:.2f}", r.ratio_of or "-", r.target or "-",
            "-" if r.met is None else ("yes" if r.met else "NO"),
        ]
        for r in rows
    ]  # fmt: skip
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |" for row in body]
    return "\n".join(lines)


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
        # Other work on the machine while the bench ran (1, 5, 15 minutes): numbers taken on a
        # loaded machine are slower and noisier, the floor's as well as cosserve's.
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
