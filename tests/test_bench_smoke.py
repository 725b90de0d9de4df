"""The bench harness at minimal sizes, so it keeps running: every workload, the table, the JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("psutil")


def test_tiny_run_writes_every_workload(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.__main__ import main

    out = tmp_path / "bench.json"
    assert main(["--tiny", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    workloads = {row["workload"] for row in result["rows"]} | {n.split(":")[0].split()[0] for n in result["notes"]}
    assert workloads == {"W1", "W2", "W3", "W4"}
    for row in result["rows"]:
        assert row["cosserve"] >= 0, row  # a server's memory may not grow at all for a small blob
        assert row["ratio"] is not None and row["ratio_of"], row  # every row is compared with something
    assert {"nproc", "cpu", "python", "grpcio", "torch"} <= set(result["machine"])
    assert "| W1" in capsys.readouterr().out
