"""`python -m bench [workloads] [--quick] [--device cpu] [--json out.json]`: run, print the tables, save JSON."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence

from bench import report, workloads
from bench.floor import KINDS
from bench.servers import ServerProcess, start_cosserve, start_floor

Workload = Callable[[ServerProcess, Mapping[str, ServerProcess], workloads.Params], list[report.Row] | str]
WORKLOADS: dict[str, Workload] = {
    "w1": workloads.w1_latency,
    "w2": workloads.w2_throughput,
    "w3": workloads.w3_transfer,
    "w4": workloads.w4_scoring,
}


def run(names: Sequence[str], params: workloads.Params) -> tuple[list[report.Row], list[str]]:
    """Start cosserve and every kind of floor, run the named workloads in order, stop the servers."""
    rows: list[report.Row] = []
    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        cosserve = stack.enter_context(start_cosserve(device=params.device))
        floors = {kind: stack.enter_context(start_floor(kind)) for kind in KINDS}
        for name in names:
            started = time.perf_counter()
            result = WORKLOADS[name](cosserve, floors, params)
            if isinstance(result, str):
                notes.append(result)
                print(result, file=sys.stderr, flush=True)
            else:
                rows += result
            print(f"{name}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return rows, notes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("workloads", nargs="*", metavar="WORKLOAD", help="w1 w2 w3 w4 (default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and shorter runs (< 2.5 minutes)")
    parser.add_argument(
        "--device", default="cpu", help="device of the cosserve sessions and Compute calls, and of the in-process "
        "torch reference: cpu, cuda, cuda:N [default cpu]",
    )  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the smoke test
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    ns = parser.parse_args(argv)
    names = [n.lower() for n in ns.workloads] or list(WORKLOADS)
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    params = workloads.Params.tiny() if ns.tiny else workloads.Params.quick() if ns.quick else workloads.Params()
    params = dataclasses.replace(params, device=ns.device)
    # Inputs are read-only views of received bytes, as in the server.
    warnings.filterwarnings("ignore", message="The given buffer is not writable")
    started = time.perf_counter()
    rows, notes = run(names, params)
    machine = report.machine()
    print(report.table(rows))
    comparison = report.floor_comparison(rows)
    if comparison:
        print("\n" + comparison + "\n")
    for note in notes:
        print(note)
    gpu = f" ({machine['gpu']})" if machine["gpu"] and params.device != "cpu" else ""
    print(
        f"({time.perf_counter() - started:.0f} s; device {params.device}{gpu}; {machine['nproc']} x {machine['cpu']}, "
        f"{machine['ram_gib']} GiB; load average {machine['loadavg']})"
    )
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(
                {
                    "mode": "tiny" if ns.tiny else "quick" if ns.quick else "full",
                    "machine": machine,
                    "params": dataclasses.asdict(params),
                    "rows": [dataclasses.asdict(r) for r in rows],
                    "notes": notes,
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
