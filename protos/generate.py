"""Regenerate the committed Python stubs in client/v1/ from protos/cosserve/v1/*.proto.

Usage: python protos/generate.py [--out DIR]   (needs the `dev` extra: grpcio-tools)
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTO_FILES = sorted(PROTO_ROOT.glob("cosserve/v1/*.proto"))
DEFAULT_OUT = ROOT / "client" / "v1"


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Write the *_pb2.py, *_pb2.pyi and *_pb2_grpc.py files into out_dir; return their paths."""
    from grpc_tools import protoc  # imported here: only the dev extra has grpcio-tools

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
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for src in sorted((pathlib.Path(tmp) / "cosserve" / "v1").iterdir()):
            dst = out_dir / src.name
            shutil.copyfile(src, dst)
            written.append(dst)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="output folder")
    ns = parser.parse_args(argv)
    for path in generate(ns.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
