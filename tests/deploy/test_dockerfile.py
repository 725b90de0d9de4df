"""The Dockerfile builds an image that serves.

No container engine runs where the tests do, so `test_image_steps_install_a_server_that_serves`
plays the image's build by hand: it reads the Dockerfile's FROM/ARG/ENV/WORKDIR/COPY/RUN steps,
runs the RUN steps with /bin/sh in the order the final stage needs them, with the image's
directories (/src, /wheels, /opt/...) moved under a temporary directory and the host's Python 3.11
standing in for the base image's, then starts the ENTRYPOINT with the image's ENV and asks it
with the HEALTHCHECK's own command. Two steps are not run as written, and only these two:
- the torch step drops its `--index-url "$TORCH_INDEX"`: torch's index is not reachable here, and
  `pip install torch==$TORCH_VERSION` finds the same CPU build in this machine's local wheels;
- the `useradd` step is skipped (it would add a user and /var/lib/cosserve to this machine); the
  static test checks that USER is the non-root user it makes.
The virtual environment is made fresh by the Dockerfile's own `python -m venv` (no system
site-packages) on every run, so a dependency missing from pyproject.toml fails here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from cosserve.server.settings import Settings

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
FIELDS = {f.name for f in dataclasses.fields(Settings)}
# The image's own directories; the steps' paths under them are moved under the test's directory.
IMAGE_DIRS = ("/opt", "/src", "/wheels")
TORCH_INDEX_OPTION = '--index-url "$TORCH_INDEX" '
STEP_TIMEOUT_S = 150


@dataclasses.dataclass
class Step:
    instruction: str  # FROM, RUN, ... upper case
    text: str  # the rest of the line, continuations joined


@dataclasses.dataclass
class Stage:
    name: str
    base: str  # an image, or an earlier stage's name
    steps: list[Step]


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages) of a Dockerfile: comments dropped, continuation lines joined."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest.strip(), re.IGNORECASE)
            assert match, f"FROM {rest}"
            stages.append(Stage(match.group(2) or f"stage{len(stages)}", match.group(1), []))
        elif not stages:
            assert instruction == "ARG", f"only ARG may come before the first FROM, not {instruction}"
            name, _, default = rest.strip().partition("=")
            global_args[name] = default
        else:
            stages[-1].steps.append(Step(instruction, rest.strip()))
    return global_args, stages


def steps(stage: Stage, instruction: str) -> list[str]:
    return [s.text for s in stage.steps if s.instruction == instruction]


def env_pairs(text: str) -> list[tuple[str, str]]:
    """`ENV A=1 B="two words"` -> [(A, 1), (B, two words)] (only the KEY=VALUE form is used)."""
    pairs = []
    for word in shlex.split(text, posix=True):
        name, sep, value = word.partition("=")
        assert sep, f"ENV {text}: write KEY=VALUE"
        pairs.append((name, value))
    return pairs


def expand(text: str, env: dict[str, str]) -> str:
    """Docker's $VAR and ${VAR} in ENV, WORKDIR and COPY (RUN leaves it to the shell)."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), text)


def final_stage(stages: list[Stage]) -> Stage:
    return stages[-1]


def test_dockerfile_final_image_is_non_root_exposes_the_ports_and_checks_health():
    _, stages = parse(DOCKERFILE.read_text())
    by_name = {s.name: s for s in stages}
    final = final_stage(stages)
    chain = [final]
    while chain[-1].base in by_name:
        chain.append(by_name[chain[-1].base])
    env: dict[str, str] = {}
    for stage in reversed(chain):
        for text in steps(stage, "ENV"):
            env.update(env_pairs(text))
    # Every COSSERVE_ variable is a real setting, and the ports are the ones it exposes.
    for name in env:
        if name.startswith("COSSERVE_"):
            assert name.removeprefix("COSSERVE_").lower() in FIELDS, name
    assert env["COSSERVE_HOST"] == "0.0.0.0"
    grpc_port, metrics_port = int(env["COSSERVE_PORT"]), int(env["COSSERVE_METRICS_PORT"])
    assert grpc_port == Settings().port
    exposed = {int(p) for text in steps(final, "EXPOSE") for p in text.split()}
    assert exposed == {grpc_port, int(env["COSSERVE_HTTP_PORT"]), metrics_port}
    assert int(env["COSSERVE_HTTP_PORT"]) == Settings().http_port
    # Non-root: USER is the uid the image's useradd makes, never 0.
    (user,) = steps(final, "USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    assert any(re.search(rf"useradd .*--uid {uid}\b", run) for stage in chain for run in steps(stage, "RUN"))
    # exec form, so SIGTERM reaches the server (not a shell) and it drains.
    (entrypoint,) = steps(final, "ENTRYPOINT")
    assert json.loads(entrypoint) == ["cosserve", "serve"]
    # The health check asks the port the server listens on, whatever COSSERVE_PORT says.
    (healthcheck,) = steps(final, "HEALTHCHECK")
    assert re.search(r'CMD cosserve health --server "127\.0\.0\.1:\$\{COSSERVE_PORT\}"$', healthcheck), healthcheck
    # torch has a layer of its own, made before any cosserve file is copied into that image.
    torch_steps = [run for stage in chain for run in steps(stage, "RUN") if TORCH_INDEX_OPTION in run]
    assert len(torch_steps) == 1 and "cosserve" not in torch_steps[0].replace("/opt/cosserve", "")
    # The CUDA image is the torch index's build argument, as the header says.
    assert "--build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu" in DOCKERFILE.read_text()


def test_dockerignore_lets_in_what_the_dockerfile_copies_and_nothing_else():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignore = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    _, stages = parse(DOCKERFILE.read_text())
    copied = set()
    for stage in stages:
        for text in steps(stage, "COPY"):
            if not text.startswith("--from"):
                copied.update(p.removeprefix("./").rstrip("/") for p in text.split()[:-1])
    assert "*" in ignore and kept == copied


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Build:
    """The Dockerfile's stages played in directories under `work`: one root per image chain."""

    def __init__(self, work: pathlib.Path, text: str) -> None:
        self.work = work
        self.global_args, self.stages = parse(text)
        self.by_name = {s.name: s for s in self.stages}
        self.roots: dict[str, pathlib.Path] = {}
        self.envs: dict[str, dict[str, str]] = {}
        self.workdirs: dict[str, str] = {}
        self.ran: list[str] = []
        # The base image's `python`: this machine's Python 3.11 itself, never a virtual environment's.
        self.shims = work / "base-image-bin"
        self.shims.mkdir()
        base_python = pathlib.Path(getattr(sys, "_base_executable", sys.executable)).resolve()
        assert sys.version_info[:2] == (3, 11), "the image's base is python:3.11"
        (self.shims / "python").symlink_to(base_python)

    def moved(self, root: pathlib.Path, text: str) -> str:
        """The image's paths in `text` as paths under `root`."""
        dirs = "|".join(re.escape(d) for d in IMAGE_DIRS)
        return re.sub(rf"(?<![\w./$-])({dirs})(?=[/\s\"':*]|$)", lambda m: f"{root}{m.group(1)}", text)

    def build(self, name: str) -> None:
        if name in self.roots:
            return
        stage = self.by_name[name]
        if stage.base in self.by_name:
            self.build(stage.base)
            root = self.roots[stage.base]
            env = dict(self.envs[stage.base])
            workdir = self.workdirs[stage.base]
        else:
            root = self.work / name
            root.mkdir()
            # The base image's environment: this machine's, less anything of a virtual environment.
            env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
            env["PATH"] = f"{self.shims}:{env.get('PATH', '/usr/bin:/bin')}"
            workdir = str(root)
        self.roots[name] = root
        for step in stage.steps:
            if step.instruction == "ARG":
                arg, _, default = step.text.partition("=")
                env[arg] = default  # build arguments are variables of the RUN steps
            elif step.instruction == "ENV":
                for key, value in env_pairs(step.text):
                    env[key] = self.moved(root, expand(value, env))
            elif step.instruction == "WORKDIR":
                workdir = self.moved(root, expand(step.text, env))
                pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
            elif step.instruction == "COPY":
                self.copy(name, root, workdir, expand(step.text, env))
            elif step.instruction == "RUN":
                self.run(root, workdir, env, step.text)
        self.envs[name] = env
        self.workdirs[name] = workdir

    def copy(self, name: str, root: pathlib.Path, workdir: str, text: str) -> None:
        words = text.split()
        source_root = ROOT
        if words[0].startswith("--from="):
            source_stage = words.pop(0).removeprefix("--from=")
            self.build(source_stage)
            source_root = self.roots[source_stage]
        *sources, dest = words
        target = pathlib.Path(self.moved(root, dest) if dest.startswith("/") else os.path.join(workdir, dest))
        for source in sources:
            origin = source_root / source.lstrip("/")
            if origin.is_dir():  # its contents go to dest, as COPY does; caches left out as by .dockerignore
                shutil.copytree(origin, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            elif dest.endswith("/"):
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target / origin.name)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target)

    def run(self, root: pathlib.Path, workdir: str, env: dict[str, str], command: str) -> None:
        if command.startswith("useradd "):
            self.ran.append(f"(skipped) {command}")
            return
        if TORCH_INDEX_OPTION in command:
            command = command.replace(TORCH_INDEX_OPTION, "")  # the local CPU wheel for torch's CPU index
        command = self.moved(root, command)
        result = subprocess.run(
            ["/bin/sh", "-c", command], cwd=workdir, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT_S
        )
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-20:])
        assert result.returncode == 0, f"RUN {command}\nexited {result.returncode}:\n{tail}"
        self.ran.append(command)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_image_steps_install_a_server_that_serves(tmp_path: pathlib.Path):
    build = Build(tmp_path, DOCKERFILE.read_text())
    final = final_stage(build.stages)
    build.build(final.name)
    root, env = build.roots[final.name], build.envs[final.name]
    assert any(run.startswith("(skipped) useradd") for run in build.ran)

    # The environment is a fresh venv of its own: no system site-packages, cosserve from its wheel.
    venv = pathlib.Path(env["VIRTUAL_ENV"])
    assert venv.is_relative_to(root)
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import cosserve, cosserve.server, torch; print(cosserve.__file__); print(torch.__version__)"],
        cwd=root, env=env, capture_output=True, text=True, timeout=60,
    )
    assert where.returncode == 0, where.stderr
    package_file, torch_version = where.stdout.split()
    assert pathlib.Path(package_file).is_relative_to(venv), package_file  # not this checkout's editable install
    assert torch_version.split("+")[0] == expand("$TORCH_VERSION", env)

    # The ENTRYPOINT with the image's ENV; loopback only here (the image says 0.0.0.0) and free ports.
    port, metrics_port, http_port = _free_port(), _free_port(), _free_port()
    serve_env = {**env, "COSSERVE_HOST": "127.0.0.1", "COSSERVE_PORT": str(port), "COSSERVE_METRICS_PORT": str(metrics_port),
                 "COSSERVE_HTTP_PORT": str(http_port)}
    (entrypoint,) = steps(final, "ENTRYPOINT")
    command = json.loads(entrypoint)
    executable = shutil.which(command[0], path=serve_env["PATH"])
    assert executable and pathlib.Path(executable).is_relative_to(venv), executable
    proc = subprocess.Popen([executable, *command[1:]], cwd=root, env=serve_env, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 90
        log = []
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            log.append(line)
            if "listening on" in line or (not line and proc.poll() is not None):
                break
        assert f"listening on 127.0.0.1:{port}" in "".join(log), "".join(log)

        # The HEALTHCHECK's command, as Docker runs it: /bin/sh -c in the container's environment.
        (healthcheck,) = steps(final, "HEALTHCHECK")
        health_command = healthcheck.split(" CMD ", 1)[1]
        health = subprocess.run(
            ["/bin/sh", "-c", health_command], cwd=root, env=serve_env, capture_output=True, text=True, timeout=30
        )
        assert health.returncode == 0 and health.stdout.strip() == f"127.0.0.1:{port}: SERVING", health

        # It serves a real call, from the image's own client, and its metrics.
        call = subprocess.run(
            [str(venv / "bin" / "python"), "-c",
             "import sys, numpy as np; from cosserve import Client\n"
             "with Client(sys.argv[1]) as c:\n"
             "    x = np.array([[3.0, 4.0]], np.float32)\n"
             "    print(c.compute('CosineSimilarity', {'X': x, 'Y': x}, ['S'])['S'].tolist())",
             f"127.0.0.1:{port}"],
            cwd=root, env=serve_env, capture_output=True, text=True, timeout=60,
        )
        assert call.returncode == 0 and call.stdout.strip() == "[1.0]", call
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
            assert b"cosserve" in reply.read()

        # SIGTERM (docker stop) drains and exits 0.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
