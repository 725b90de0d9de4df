"""The bench harness at minimal sizes, so it keeps running: every workload, both floors, the tables, the JSON."""

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
    floor_rows = [row for row in result["rows"] if row["floors"]]
    assert {row["workload"] for row in floor_rows} == {"W1", "W2", "W3"}
    for row in floor_rows:  # both floors measured, the ratio taken to the faster one
        assert set(row["floors"]) == {"threaded", "aio"}, row
        assert {"floor_threaded", "floor_aio"} <= set(row["samples"]), row
        pick = min if row["lower_is_better"] else max
        faster = pick(row["floors"], key=row["floors"].__getitem__)
        assert row["ratio_of"] == f"cosserve/floor({faster})", row
    assert result["params"]["device"] == "cpu"
    assert {"nproc", "cpu", "python", "grpcio", "torch"} <= set(result["machine"])
    printed = capsys.readouterr().out
    assert "| W1" in printed and "aio/threaded" in printed


def test_floors_answer_alike() -> None:
    """The threaded and the aio floor give the same answers to the same calls."""
    import numpy as np

    from bench.floor import KINDS, FloorClient
    from bench.servers import start_floor

    blob = np.arange(5 * 2**20 + 3, dtype=np.uint8)
    for kind in KINDS:
        with start_floor(kind) as server, FloorClient(server.address) as floor:
            floor.configure(answer_bytes=100, blob_bytes=3 * 2**20 + 1, chunk_bytes=2**20)
            assert floor.unary(b"x" * 1000, timeout=10) == bytes(100), kind
            floor.feed(blob, 2**20)  # raises unless the floor counted every byte
            fetched = floor.fetch()
            assert len(fetched) == 3 * 2**20 + 1 and (fetched == 1).all(), kind
