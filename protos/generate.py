"""Regenerate the committed Python stubs from protos/cosserve/**/*.proto.

protos/cosserve/<dir>/x.proto becomes client/<dir>/x_pb2.py, x_pb2.pyi and x_pb2_grpc.py, imported
as cosserve.<dir>.x_pb2 (client/ is the `cosserve` package).

Usage: python3 protos/generate.py [--out DIR]

The stubs are the output of one pinned generator, GENERATOR_REQUIREMENTS (tests/project/test_stubs.py
checks them byte for byte). That grpcio-tools needs protobuf 5, while the project runs on protobuf 7,
so no extra installs it: run with any other interpreter, this script makes (once, under
.cache/toolenvs/, with tests/toolenv.py) a venv of its own with the pin and reruns itself there.
It needs a package registry the first time only.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import pathlib
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTO_FILES = sorted(PROTO_ROOT.glob("cosserve/**/*.proto"))
DEFAULT_OUT = ROOT / "client"  # stands for protos/cosserve/
# The generator that made the committed stubs (gencode of protobuf 5.27.2). It requires
# protobuf < 6, so it lives in its own venv: beside the suite it would downgrade protobuf 7.
GENERATOR_REQUIREMENTS = ["grpcio-tools==1.66.2"]


def has_pinned_generator() -> bool:
    """Whether this interpreter has exactly the pinned grpcio-tools."""
    name, _, version = GENERATOR_REQUIREMENTS[0].partition("==")
    try:
        return importlib.metadata.version(name) == version
    except importlib.metadata.PackageNotFoundError:
        return False


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Write the *_pb2.py, *_pb2.pyi and *_pb2_grpc.py files under out_dir (which stands for
    protos/cosserve/, so v1's go to out_dir/v1/); return their paths."""
    from grpc_tools import protoc  # imported here: only the generator's venv has grpcio-tools

    with tempfile.TemporaryDirectory() as tmp:
        include = pathlib.Path(protoc.__file__).parent / "_proto"
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *[str(p.relative_to(PROTO_ROOT)) for p in PROTO_FILES],
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed: " + " ".join(args))
        generated = pathlib.Path(tmp) / "cosserve"
        written = []
        for src in sorted(p for p in generated.rglob("*") if p.is_file()):
            dst = out_dir / src.relative_to(generated)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            written.append(dst)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="output folder standing for protos/cosserve/ (default: client/)")
    ns = parser.parse_args(argv)
    if not has_pinned_generator():
        sys.path.insert(0, str(ROOT / "tests"))
        import toolenv  # tests/toolenv.py: a venv per tool, made once and kept

        interpreter = toolenv.python("stubgen", GENERATOR_REQUIREMENTS)
        return subprocess.run([str(interpreter), __file__, "--out", str(ns.out.resolve())]).returncode
    for path in generate(ns.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
