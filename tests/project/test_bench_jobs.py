"""bench.jobs at minimal sizes, so it keeps running: every job, its reference rates, the JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("psutil")
pytest.importorskip("pyarrow")


def test_tiny_jobs_bench_measures_every_job(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.jobs import main

    out = tmp_path / "jobs.json"
    assert main(["--rows", "2000", "--dim", "32", "--queries", "64", "--pairs", "4000", "--min-score", "0.5", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for job in ("topk", "pairs", "threshold"):
        assert result[job]["job"] > 0 and result[job]["service"] > 0 and result[job]["inprocess"] > 0, job
    assert result["threshold"]["hits"] > 0
    if "faiss_hits" in result["threshold"]:  # the same pairs as faiss
        assert abs(result["threshold"]["faiss_hits"] - result["threshold"]["hits"]) <= 2  # a pair on the fence may differ
    assert "| topk |" in capsys.readouterr().out
