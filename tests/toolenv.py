"""Tool environments: a program a test runs that must not share the suite's packages gets its own
virtual environment, made once and kept.

The suite runs on the newest versions the project allows (protobuf 7, say), while some tools pin
older ones: the stub generator (grpcio-tools, pinned so the committed stubs are reproducible,
needs protobuf 5) and tritonclient (protobuf < 7, ml-dtypes <= 0.5.4). Installing those beside the
suite would downgrade the very packages under test, so each lives in a venv of its own under
`.cache/toolenvs/` (or $COSSERVE_TOOLENVS), keyed by its requirements. The venv sees the suite's
site-packages, so only what a tool pins differently is downloaded.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import pathlib
import subprocess
import sys
import venv
from collections.abc import Sequence

ROOT = pathlib.Path(__file__).resolve().parent.parent
INSTALL_TIMEOUT_S = 900


def toolenvs_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("COSSERVE_TOOLENVS") or ROOT / ".cache" / "toolenvs")


def python(name: str, requirements: Sequence[str]) -> pathlib.Path:
    """The interpreter of the venv `name` with `requirements` installed; made on first use.

    Raises RuntimeError with pip's last lines when the install fails (no registry, say), so the
    test that needs the tool fails and says why rather than skipping.
    """
    key = hashlib.sha256("\n".join([sys.version, *requirements]).encode()).hexdigest()[:12]
    home = toolenvs_dir() / f"{name}-{key}"
    interpreter = home / "bin" / "python"
    done = home / ".installed"
    home.parent.mkdir(parents=True, exist_ok=True)
    with open(home.parent / f"{name}-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test processes never build one venv at once
        if done.exists():
            return interpreter
        venv.EnvBuilder(system_site_packages=True, clear=True, with_pip=True).create(home)
        command = [str(interpreter), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *requirements]
        result = subprocess.run(command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        if result.returncode != 0:
            tail = (result.stdout + result.stderr).strip().splitlines()[-15:]
            raise RuntimeError(f"could not install {list(requirements)} into {home}:\n" + "\n".join(tail))
        done.touch()
    return interpreter
