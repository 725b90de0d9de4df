"""A copy of the package laid out as pip installs it, for tools that walk folders.

pyproject.toml maps `cosserve` to client/ and `cosserve.server` to server/, which lies beside
client/, not in it. import-linter's graph builder and mypy find modules by their folders, so on
the checkout they would miss cosserve.server (or read client/ as a package named `client`, whose
`cosserve.*` imports then resolve to nothing). They run on this copy instead.
"""

from __future__ import annotations

import pathlib
import shutil

ROOT = pathlib.Path(__file__).resolve().parent.parent


def installed_layout(root: pathlib.Path) -> pathlib.Path:
    """`root` holding cosserve/ (client/, with server/ as cosserve/server/) and pyproject.toml."""
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "client", root / "cosserve", ignore=ignore)
    shutil.copytree(ROOT / "server", root / "cosserve" / "server", ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", root)
    return root
