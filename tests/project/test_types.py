"""server/ and client/ type-check (mypy, configured in pyproject.toml), as the one package cosserve."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from tests.installed_layout import installed_layout


def test_mypy_finds_no_errors(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("mypy", reason="type checking needs the dev extra (mypy)")
    # On the installed layout, so that what one module of cosserve takes from another is checked
    # (on the checkout, mypy reads client/ as a package `client`, and every cosserve.* import as Any).
    stage = installed_layout(tmp_path / "stage")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"), "-p", "cosserve"],
        cwd=stage, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
