"""The layers as rules: the import-linter contracts of pyproject.toml hold on this tree, and each
one breaks when a violation is planted in a copy of it.

import-linter builds its graph by walking the installed package's folder, and cosserve.server is
mapped from server/, which lies beside client/, not in it: each run lints a copy laid out as pip
installs it (tests/installed_layout.py).
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import tomllib

import pytest

from tests.installed_layout import installed_layout

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONTRACTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
_NAMES = {c["id"]: c["name"] for c in CONTRACTS}

pytest.importorskip("importlinter", reason="the layer contracts need the dev extra (import-linter)")


def _lint(stage: pathlib.Path, *contracts: str) -> subprocess.CompletedProcess[str]:
    script = (
        "import sys\nfrom importlinter.cli import lint_imports\n"
        f"sys.exit(lint_imports(config_filename='pyproject.toml', limit_to_contracts={contracts!r}, no_cache=True, no_logo=True))"
    )
    # PYTHONPATH first: `cosserve` is the copy's, not the editable install's.
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(stage), "PYTHONSAFEPATH": "1"}
    return subprocess.run([sys.executable, "-c", script], cwd=stage, env=env, capture_output=True, text=True, timeout=300)


def test_every_contract_holds(tmp_path: pathlib.Path) -> None:
    result = _lint(installed_layout(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(CONTRACTS)} kept, 0 broken" in result.stdout, result.stdout


# (contract, file of the copy, the planted line): one violation of each rule.
PLANTED = [
    ("server-layers", "cosserve/server/state/workspace.py", "from cosserve.server.edge import app"),
    ("server-layers", "cosserve/server/compute/engine.py", "from cosserve.server.protocols import codec"),
    ("server-layers", "cosserve/server/errors.py", "from cosserve.server import settings"),
    ("core-without-grpc", "cosserve/server/compute/similarity.py", "import grpc"),
    ("core-without-grpc", "cosserve/server/state/sessions.py", "from grpc import aio"),
    ("client-without-torch-or-server", "cosserve/sharded.py", "import torch"),
    ("client-without-torch-or-server", "cosserve/client.py", "from cosserve.server import settings"),
    ("client-package-without-torch-or-server", "cosserve/__init__.py", "import torch"),
    ("client-layers", "cosserve/calls.py", "from cosserve import client"),
    ("client-layers", "cosserve/client.py", "from cosserve import aio"),
    ("client-layers", "cosserve/tensors.py", "from cosserve import calls"),
    ("wire-without-arrays-or-grpc", "cosserve/wire.py", "import numpy"),
    ("wire-without-arrays-or-grpc", "cosserve/wire.py", "import grpc"),
]


@pytest.mark.parametrize(("contract", "path", "line"), PLANTED, ids=[f"{c}:{line}" for c, _, line in PLANTED])
def test_a_planted_violation_breaks_its_contract(tmp_path: pathlib.Path, contract: str, path: str, line: str) -> None:
    stage = installed_layout(tmp_path)
    with open(stage / path, "a") as source:
        source.write(f"\n{line}  # planted\n")
    result = _lint(stage, contract)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{_NAMES[contract]} BROKEN" in " ".join(result.stdout.split()), result.stdout


def test_the_client_contract_names_every_client_module() -> None:
    """A new module of client/ is under the client's contract unless it is the command line."""
    (contract,) = [c for c in CONTRACTS if c["id"] == "client-without-torch-or-server"]
    modules = {
        f"cosserve.{p.stem}"
        for p in (ROOT / "client").iterdir()
        if p.name not in ("__init__.py", "cli", "py.typed", "__pycache__") and (p.suffix == ".py" or p.is_dir())
    }
    assert modules == set(contract["source_modules"])
